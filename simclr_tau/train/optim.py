"""Optimizer, parameter groups and the per-step learning-rate schedule.

Parameter groups (SimCLR / MoCo v3 practice):
- weights (ndim > 1): weight decay, LARS adaptation;
- biases and normalization parameters (ndim <= 1): no weight decay, no LARS adaptation;
- temperature parameters: their own learning rate (``temperature.lr_scale`` x the base lr), no weight
  decay, no LARS adaptation (a scalar's trust ratio is meaningless).

Learning rate (Goyal et al. 2017 / SimCLR): ``lr = optim.lr x B/256`` (linear scaling; ``sqrt``:
``x sqrt(B/256)``, recommended by SimCLR for LARS with small batches), linear warm-up for
``warmup_epochs``, then cosine decay to ``final_lr_ratio x lr`` (Loshchilov & Hutter 2017).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import nn


def scaled_lr(cfg: Any, batch_size: int) -> float:
    """The peak learning rate for a global batch ``batch_size`` under ``optim.lr_scaling``."""
    factor = {"linear": batch_size / 256, "sqrt": math.sqrt(batch_size / 256), "none": 1.0}[cfg.lr_scaling]
    return cfg.lr * factor


def param_groups(model: nn.Module, weight_decay: float, tau_lr_scale: float) -> List[Dict[str, Any]]:
    """Split trainable parameters into decayed weights, non-decayed biases/norms and temperature params."""
    decay, no_decay, tau = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("temperature.") or ".temperature." in name:
            tau.append(p)
        elif p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "name": "bias_norm"},
        {"params": tau, "weight_decay": 0.0, "lr_scale": tau_lr_scale, "name": "temperature"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: Any, model: nn.Module, tau_lr_scale: float, lr: float) -> torch.optim.Optimizer:
    """SGD (Nesterov-free, momentum), AdamW or LARS (timm) over :func:`param_groups`."""
    groups = param_groups(model, cfg.weight_decay, tau_lr_scale)
    # fused=True: one kernel per step for all parameters (CPU and CUDA in torch >= 2.4); same update rule.
    fused = {"fused": True} if cfg.fused else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, **fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), **fused)
    from timm.optim import Lars

    # timm's Lars adapts only groups with weight decay (always_adapt=False): exactly our exclusions.
    return Lars(groups, lr=lr, momentum=cfg.momentum)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, final_ratio: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine to ``final_ratio x peak``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    final = peak * final_ratio
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
