"""RankMe: the effective rank of a set of representations, a label-free predictor of downstream accuracy.

Garrido, Balestriero, Najman, LeCun (ICML 2023), "RankMe: Assessing the Downstream Performance of Pretrained
Self-Supervised Representations by Their Rank". With σ_1 ≥ … ≥ σ_K (K = min(N, D)) the singular values of
the (N, D) matrix of representations,

    p_k = σ_k / ‖σ‖₁ + ε          RankMe = exp(−Σ_k p_k log p_k)

the exponential of the entropy of the normalized spectrum (Roy & Vetterli 2007's effective rank, with ε
for numerical stability). It lies in [~1, K]: ≈ r for r equal non-zero singular values, ≈ 1 for a
collapsed (one-direction) representation; it does not change when the matrix is scaled or rotated.

The paper computes it on the encoder's output (the representations a downstream probe reads, not the
projector's embeddings) of about 25.6k images. The online evaluation here
(:func:`simclr_tau.evaluation.knn.online_knn`) computes it on the raw (not L2-normalized) encoder features
of the held-out test split it already encodes as kNN queries (10k images for Fashion-MNIST and CIFAR, 8k
for STL-10), so it costs one SVD and no second pass over the data.

Example:
    >>> import torch
    >>> round(rankme(torch.eye(4)[:, :3].repeat(2, 1)), 3)  # three equal singular values
    3.0
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def rankme(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe of an (N, D) matrix (rows = samples), computed in float64 from ``torch.linalg.svdvals``.

    Returns ``nan`` if the matrix holds a non-finite value and ``0.0`` for an all-zero matrix (rank 0;
    the formula's 0/0). ValueError unless ``embeddings`` is 2-D with N >= 2 rows and D >= 1 columns.
    The SVD is the cost: about 1 s for a 10000 x 512 matrix on two CPU cores.
    """
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"rankme: expected an (N, D) matrix of embeddings; got {shape}")
    n, d = embeddings.shape
    if n < 2 or d < 1:
        raise ValueError(f"rankme: need at least 2 embeddings of width >= 1; got shape ({n}, {d})")
    if not eps >= 0:
        raise ValueError(f"rankme: eps={eps} must be >= 0")
    x = embeddings.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        return math.nan
    sigma = torch.linalg.svdvals(x)  # K = min(N, D), descending
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total + eps  # K
    return math.exp(-float(torch.special.xlogy(p, p).sum()))  # xlogy: 0 log 0 = 0 when eps = 0
