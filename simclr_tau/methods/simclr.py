"""SimCLR (Chen et al. 2020): encoder f, projection g, NT-Xent over the two views' projections."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from simclr_tau.losses import nt_xent
from simclr_tau.temperature import Temperature


class SimCLR(nn.Module):
    """``forward(x1, x2) -> (loss, logs)``; logs are 0-d tensors (τ statistics), read at log time only.

    A conditional τ reads the projections z = g(f(x)) of both views, in the order [z1; z2] that
    :func:`~simclr_tau.losses.nt_xent` expects for per-anchor τ.
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module, temperature: Temperature) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.temperature = temperature
        self.last_tau: Tensor | None = None  # per-sample τ of the last batch (for histograms)

    def forward(self, x1: Tensor, x2: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        # One encoder pass over both views: BatchNorm sees 2N samples, as in the reference implementation.
        z = self.projector(self.encoder(torch.cat([x1, x2], dim=0)))  # 2N x proj_dim
        z1, z2 = z.chunk(2, dim=0)
        tau = self.temperature(z)  # 0-d, or (2N,) per anchor for conditional τ
        loss = nt_xent(z1, z2, tau)
        if tau.ndim == 1:
            self.last_tau = tau.detach()
        return loss, self.temperature.stats(tau)

    def before_step(self, step: int) -> None:
        self.temperature.step(step)

    def after_step(self, step: int) -> None:
        self.temperature.project_()

    def observe(self, metric: float) -> None:
        """A monitored metric (online kNN top-1) for a plateau τ schedule."""
        self.temperature.observe(metric)
