"""MLP heads: the SimCLR/MoCo projection head and the MoCo v3 predictor."""

from __future__ import annotations

from typing import Any, List

from torch import nn


OUT_BN = ("none", "plain", "affine")


def out_bn_for(model_cfg: Any, method: str) -> str:
    """``model.proj_out_bn`` with ``auto`` resolved: ``plain`` for MoCo v3 (its projector's BN without affine
    parameters), ``none`` for every other method (SimCLR's and MoCo v2's projector ends in a Linear)."""
    choice = getattr(model_cfg, "proj_out_bn", "auto")
    return ("plain" if method == "mocov3" else "none") if choice == "auto" else choice


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, out_bn: str = "none", bn: bool = True
) -> nn.Sequential:
    """Linear-BN-ReLU x (layers-1), then Linear, then ``out_bn``: nothing (``none``), a BatchNorm without
    scale and shift (``plain``, MoCo v3) or with them (``affine``, lightly's ``SimCLRProjectionHead``); the
    Linear before an output BatchNorm has no bias (the BatchNorm removes it).

    ``bn=False`` drops every BatchNorm (a BN-free head).

    SimCLR (Chen et al. 2020) uses a 2-layer MLP g(h) = W2 ReLU(BN(W1 h)) projecting to 128-d.
    """
    if layers < 1:
        raise ValueError(f"model.proj_layers={layers} must be >= 1")
    if out_bn not in OUT_BN:
        raise ValueError(f"out_bn={out_bn!r} must be one of {OUT_BN}")
    last_bn = out_bn != "none" and bn
    mods: List[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden_dim, bias=not bn), nn.BatchNorm1d(hidden_dim) if bn else nn.Identity(), nn.ReLU(inplace=True)]
        d = hidden_dim
    mods.append(nn.Linear(d, out_dim, bias=not last_bn))
    if last_bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=out_bn == "affine"))
    return nn.Sequential(*mods)
