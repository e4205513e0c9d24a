"""InfoNCE, the MoCo loss (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
Learning", eq. 1), with scalar or per-query τ.

MoCo v2 (queue of K negative keys), for a query q_i, its key k_i and the queue {n_j}:

    ℓ_i = −log exp(q_i·k_i / τ_i) / (exp(q_i·k_i / τ_i) + Σ_j exp(q_i·n_j / τ_i))

MoCo v3 (Chen et al. 2021, "An Empirical Study of Training Self-Supervised Vision Transformers"): no queue,
the negatives are the other keys of the (global) batch: ℓ_i = CE(q_i·K_all^T / τ_i, index of k_i).

``decoupled=True`` (DCL, Yeh et al. 2022): the positive leaves the denominator,
ℓ_i = −q_i·k_i / τ_i + log Σ_j exp(q_i·n_j / τ_i) over the negatives only.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_tau.distributed import all_gather_no_grad, rank_and_world
from simclr_tau.losses.nt_xent import TauLike, check_tau, upcast


def _scale(logits: Tensor, tau: Tensor | float) -> Tensor:
    if isinstance(tau, Tensor):
        tau = upcast(tau)
        return logits / (tau[:, None] if tau.ndim == 1 else tau)
    return logits / tau


def info_nce(q: Tensor, k: Tensor, queue: Optional[Tensor], tau: TauLike, decoupled: bool = False) -> Tensor:
    """MoCo v2 InfoNCE of queries ``q`` (N, D) against keys ``k`` (N, D) and negatives ``queue`` (K, D).

    ``q`` keeps its gradient; ``k`` and ``queue`` are treated as constants (detached), as in MoCo.
    All three are L2-normalized here. ``tau``: float, 0-d tensor or shape (N,) (one per query).
    The positive is logit 0 (shape comment: logits are N x (1 + K)).
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both have shape (N, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue is not None and (queue.ndim != 2 or queue.shape[1] != q.shape[1]):
        raise ValueError(f"queue must have shape (K, {q.shape[1]}); got {tuple(queue.shape)}")
    tau = check_tau(tau, q.shape[0])
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(upcast(q), dim=1)
        k = F.normalize(upcast(k.detach()), dim=1)
        pos = (q * k).sum(dim=1, keepdim=True)  # N x 1
        if queue is not None:
            neg = q @ F.normalize(upcast(queue.detach()), dim=1).T  # N x K
            logits = torch.cat([pos, neg], dim=1)  # N x (1 + K)
        else:
            logits = pos
        logits = _scale(logits, tau)
        if decoupled:
            if queue is None:
                raise ValueError("decoupled InfoNCE needs negatives (a queue)")
            return (torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]).mean()
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)


def info_nce_in_batch(q: Tensor, k: Tensor, tau: TauLike, gather: bool = True, decoupled: bool = False) -> Tensor:
    """MoCo v3 InfoNCE: query i against all keys of the global batch; the positive is its own key.

    Keys come from the momentum encoder and carry no gradient, so a plain (no-grad) all-gather is exact.
    Returns the mean over local queries. (MoCo v3's extra factor 2τ is *not* applied here; see
    :mod:`simclr_tau.methods.moco` for why.)
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both have shape (N, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    tau = check_tau(tau, q.shape[0])
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(upcast(q), dim=1)
        k = F.normalize(upcast(k.detach()), dim=1)
        rank, world = rank_and_world() if gather else (0, 1)
        keys = all_gather_no_grad(k) if world > 1 else k  # NW x D
        logits = _scale(q @ keys.T, tau)  # N x NW
        labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
        if decoupled:
            pos = logits.gather(1, labels[:, None]).squeeze(1)
            return (torch.logsumexp(logits.scatter(1, labels[:, None], float("-inf")), dim=1) - pos).mean()
        return F.cross_entropy(logits, labels)
