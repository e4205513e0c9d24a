"""Representation diagnostics of Wang & Isola 2020, "Understanding Contrastive Representation Learning
through Alignment and Uniformity on the Hypersphere".

    alignment  = E_{(x, y) positive} ‖f(x) − f(y)‖₂^α               (α = 2; lower is better)
    uniformity = log E_{x, y i.i.d.} exp(−t ‖f(x) − f(y)‖₂²)          (t = 2; lower is better)

Both on L2-normalized embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_tau.losses.nt_xent import upcast


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    """Mean ‖x_i − y_i‖^α over positive pairs (rows of x and y), after L2 normalization."""
    x, y = F.normalize(upcast(x), dim=1), F.normalize(upcast(y), dim=1)
    return (x - y).norm(dim=1).pow(alpha).mean()


def uniformity(x: Tensor, t: float = 2.0) -> Tensor:
    """log of the mean Gaussian potential exp(−t‖x_i − x_j‖²) over distinct pairs i < j."""
    x = F.normalize(upcast(x), dim=1)
    sq = torch.pdist(x, p=2).pow(2)  # n(n-1)/2 pairwise squared distances
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())
