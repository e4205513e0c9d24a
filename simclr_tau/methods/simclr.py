"""SimCLR (Chen et al. 2020): encoder f, projection g, NT-Xent over the two views' projections; or, for a
τ trained by the robust objective (``temperature.objective == "dro"``), the iSogCLR / SogCLR loss over the
same global batch (:func:`simclr_tau.temperature.dro.robust_loss`)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

import torch.nn.functional as F

from simclr_tau.distributed import all_gather_with_grad, rank_and_world
from simclr_tau.losses import nt_xent
from simclr_tau.losses.dro import simclr_margins
from simclr_tau.losses.nt_xent import upcast
from simclr_tau.temperature import Temperature, robust_loss


def positive_alignment(z1: Tensor, z2: Tensor) -> Tensor:
    """A = mean_i cos(z1_i, z2_i), detached (0-d): what MACL's adaptive τ reads."""
    with torch.no_grad():
        return (F.normalize(upcast(z1), dim=1) * F.normalize(upcast(z2), dim=1)).sum(1).mean()


class SimCLR(nn.Module):
    """``forward(x1, x2) -> (loss, logs)``; logs are 0-d tensors (τ statistics), read at log time only.

    A conditional τ reads the projections z = g(f(x)) of both views, in the order [z1; z2] that
    :func:`~simclr_tau.losses.nt_xent` expects for per-anchor τ.
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module, temperature: Temperature,
                 decoupled: bool = False) -> None:
        super().__init__()
        self.decoupled = decoupled  # DCL: the positive leaves the denominator
        self.encoder = encoder
        self.projector = projector
        self.temperature = temperature
        self.last_tau: Tensor | None = None  # per-sample τ of the last batch (for histograms)

    def forward(self, x1: Tensor, x2: Tensor, index: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``index``: the dataset indices of the N images (both views), for per-sample τ state."""
        # One encoder pass over both views: BatchNorm sees 2N samples, as in the reference implementation.
        z = self.projector(self.encoder(torch.cat([x1, x2], dim=0)))  # 2N x proj_dim
        z1, z2 = z.chunk(2, dim=0)
        # 0-d, or per anchor: (2N,) for conditional τ, (N,) per image for a per-sample dro τ
        alignment = positive_alignment(z1, z2) if self.temperature.reads_alignment else None
        tau = self.temperature(z, index=index, alignment=alignment)
        extra: Dict[str, Tensor] = {}
        if self.temperature.objective == "dro":
            with torch.autocast(device_type=z.device.type, enabled=False):
                u = F.normalize(upcast(z), dim=1)  # 2N x D local anchors
                rank, world = rank_and_world()
                candidates = all_gather_with_grad(u) if world > 1 else u  # 2NW x D, rank-major as in nt_xent
                h, mask = simclr_margins(u, candidates, rank * u.shape[0])
            loss, extra = robust_loss(self.temperature, h, mask, tau, index, views=2)
        else:
            loss = nt_xent(z1, z2, tau, decoupled=self.decoupled)
        if tau.ndim == 1:
            self.last_tau = tau.detach()
        return loss, {**self.temperature.stats(tau), **extra}

    def before_step(self, step: int) -> None:
        self.temperature.step(step)

    def after_step(self, step: int) -> None:
        self.temperature.project_()

    def observe(self, metric: float) -> None:
        """A monitored metric (online kNN top-1) for a plateau τ schedule."""
        self.temperature.observe(metric)
