"""NT-Xent, the SimCLR loss (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", eq. 1), with scalar or per-anchor τ and global negatives across processes.

For 2N L2-normalized embeddings u = [z1; z2] and anchor i with positive p(i) (the other view):

    ℓ_i = −log  exp(u_i·u_p(i) / τ_i) / Σ_{k ≠ i} exp(u_i·u_k / τ_i)
    L   = (1 / 2N) Σ_i ℓ_i

computed as a cross-entropy over masked logits (log-sum-exp), never as exp-then-sum: exp(1/τ) overflows
float32 once τ < 1/88.7 ≈ 0.011.

Decoupled (DCL, Yeh et al. 2022, "Decoupled Contrastive Learning"): the positive leaves the denominator,

    ℓ_i = −u_i·u_p(i) / τ_i + log Σ_{k ∉ {i, p(i)}} exp(u_i·u_k / τ_i)

which removes the negative-positive coupling factor that makes NT-Xent's gradient vanish once the positive
dominates the softmax (small batches, small τ).
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from simclr_tau.distributed import all_gather_with_grad, rank_and_world

TauLike = Union[float, Tensor]


def upcast(x: Tensor) -> Tensor:
    """``x`` in at least float32: half precision (and integers) become float32, float64 stays float64.

    Losses compute in this precision so that bf16/fp16 activations never reach a softmax, while float64
    inputs (gradcheck, reference checks) keep float64 end to end.
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_tau(tau: TauLike, num_anchors: int, name: str = "tau") -> Tensor | float:
    """Validate a scalar or per-anchor τ. Raises ValueError naming the expected shape."""
    if isinstance(tau, Tensor):
        if tau.ndim == 0:
            return tau
        if tau.shape != (num_anchors,):
            raise ValueError(f"{name} must be a scalar or have shape ({num_anchors},) (one per anchor); got {tuple(tau.shape)}")
        return tau
    if not float(tau) > 0:
        raise ValueError(f"{name}={tau} must be > 0")
    return float(tau)


def nt_xent(z1: Tensor, z2: Tensor, tau: TauLike, gather: bool = True, decoupled: bool = False) -> Tensor:
    """SimCLR NT-Xent loss of two views ``z1``, ``z2`` of shape (N, D).

    Args:
        z1, z2: projections of the two views (not necessarily normalized); row i of z1 and z2 are positives.
        tau: a float, a 0-d tensor, or a tensor of shape (2N,) giving anchor i of [z1; z2] its own τ_i
            (used for its positive and all its negatives).
        gather: when torch.distributed is initialized, contrast the local anchors against the global
            batch gathered from all processes (with gradient). With W processes of N pairs each this is,
            after DDP's gradient averaging, exactly the loss and gradient of one process with W·N pairs.
        decoupled: DCL: leave the positive out of the denominator (module docstring).

    Returns:
        The mean of ℓ_i over the local 2N anchors (a 0-d tensor: float32, or float64 for float64 inputs).

    Example:
        >>> z = torch.randn(8, 16)
        >>> float(nt_xent(z, z, 0.5)) < float(nt_xent(z, torch.randn(8, 16), 0.5))
        True
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both have shape (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    tau = check_tau(tau, 2 * n)
    # Similarities in (at least) float32 even under autocast: bf16 logits at τ = 0.01 lose the positive's margin.
    with torch.autocast(device_type=z1.device.type, enabled=False):
        u = F.normalize(upcast(torch.cat([z1, z2], dim=0)), dim=1)  # local anchors: 2N x D
        rank, world = rank_and_world() if gather else (0, 1)
        candidates = all_gather_with_grad(u) if world > 1 else u  # 2NW x D, rank-major: [z1_r; z2_r]
        logits = u @ candidates.T  # 2N x 2NW cosine similarities
        if isinstance(tau, Tensor):
            tau = upcast(tau)
            logits = logits / (tau[:, None] if tau.ndim == 1 else tau)
        else:
            logits = logits / tau
        idx = torch.arange(2 * n, device=u.device)
        offset = rank * 2 * n  # where this rank's anchors sit among the candidates
        self_mask = F.one_hot(idx + offset, candidates.shape[0]).bool()
        logits = logits.masked_fill(self_mask, float("-inf"))
        positives = offset + (idx + n) % (2 * n)  # anchor i in z1 pairs with i in z2 and back
        if decoupled:
            pos = logits.gather(1, positives[:, None]).squeeze(1)  # (2N,)
            neg = logits.scatter(1, positives[:, None], float("-inf"))  # 2N x 2NW: self and positive masked
            return (torch.logsumexp(neg, dim=1) - pos).mean()
        return F.cross_entropy(logits, positives)
