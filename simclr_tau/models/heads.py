"""MLP heads: the SimCLR/MoCo projection head and the MoCo v3 predictor."""

from __future__ import annotations

from typing import List

from torch import nn


def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, last_bn: bool = False, bn: bool = True
) -> nn.Sequential:
    """Linear-BN-ReLU x (layers-1), then Linear (+ BN without affine if ``last_bn``, as MoCo v3).

    ``bn=False`` drops every BatchNorm (a BN-free head).

    SimCLR (Chen et al. 2020) uses a 2-layer MLP g(h) = W2 ReLU(BN(W1 h)) projecting to 128-d.
    """
    if layers < 1:
        raise ValueError(f"model.proj_layers={layers} must be >= 1")
    mods: List[nn.Module] = []
    d = in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden_dim, bias=not bn), nn.BatchNorm1d(hidden_dim) if bn else nn.Identity(), nn.ReLU(inplace=True)]
        d = hidden_dim
    mods.append(nn.Linear(d, out_dim, bias=not (last_bn and bn)))
    if last_bn and bn:
        mods.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*mods)
