"""Self-supervised methods. Each is an nn.Module with ``forward(x1, x2) -> (loss, logs)`` and the
hooks ``before_step(step)`` / ``after_step(step)`` that the training loop calls on the unwrapped module."""

from __future__ import annotations

from typing import Any

from torch import nn

from simclr_tau.methods.simclr import SimCLR
from simclr_tau.models import build_encoder, mlp, out_bn_for
from simclr_tau.temperature import build_temperature

__all__ = ["SimCLR", "build_method"]


def build_method(cfg: Any, in_chans: int, steps_per_epoch: int, total_steps: int, num_samples: int = 0) -> nn.Module:
    """Build the method ``cfg.train.method`` names, with its encoder, heads and temperature
    (``num_samples``: the training set's size, for per-sample τ tables)."""
    if cfg.train.method in ("mocov2", "mocov3"):
        from simclr_tau.methods.moco import build_moco

        return build_moco(cfg, in_chans, steps_per_epoch, total_steps, num_samples)
    encoder, feat_dim = build_encoder(cfg.model, in_chans)
    m = cfg.model
    projector = mlp(feat_dim, m.proj_hidden_dim, m.proj_dim, m.proj_layers, out_bn_for(m, cfg.train.method), bn=m.proj_bn)
    temperature = build_temperature(cfg.temperature, m.proj_dim, steps_per_epoch, total_steps, num_samples=num_samples)
    return SimCLR(encoder, projector, temperature, decoupled=bool(cfg.get("loss", {}).get("decoupled", False)))
