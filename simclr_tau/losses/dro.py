"""The robust (DRO) temperature objective of SogCLR / iSogCLR, as pure functions.

SogCLR: Yuan et al. 2022, "Provable Stochastic Optimization for Global Contrastive Learning: Small Batch
Does Not Harm Performance" (arXiv 2202.12387). iSogCLR: Qiu et al. 2023, "Not All Semantics are Created
Equal: Contrastive Self-supervised Learning with Automatic Temperature Individualization" (arXiv 2305.11965).

For anchor i with m_i negatives j, margins h_ij = s_ij − s_i⁺ (cosine to negative j minus cosine to the
positive) and its own τ_i > 0:

    g_i  = (1/m_i) Σ_j exp(h_ij / τ_i)                  batch estimate of the partition function
    F_i  = τ_i log g_i + ρ τ_i                          robust objective (KL-constrained DRO over negatives)
    p_ij = exp(h_ij / τ_i) / Σ_j exp(h_ij / τ_i)
    KL_i = Σ_j p_ij log(m_i p_ij) = KL(p_i ‖ uniform)
    ∂F_i/∂τ_i = log g_i − Σ_j p_ij h_ij / τ_i + ρ = ρ − KL_i

so τ_i is at its optimum when the softmax over its negatives sits at KL distance ρ from uniform. SogCLR
replaces g_i by a moving average ū_i ← (1 − γ) ū_i + γ g_i, kept here in log space (h/τ reaches 200 at
τ = 0.01, far beyond float32's exp), and iSogCLR moves τ_i by a projected momentum step on
G_i = log ū_i + ρ − (1/m_i) Σ_j [exp(h_ij/τ_i) / ū_i] h_ij / τ_i. Everything is a log-sum-exp; nothing
exponentiates an unshifted h/τ.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from simclr_tau.losses.nt_xent import TauLike, upcast


class RobustTerms(NamedTuple):
    """Per-anchor terms of the robust objective, all of shape (B,)."""

    objective: Tensor  # F_i = τ_i log ū_i + ρ τ_i (ū_i = g_i for the batch estimator); detached, for logging
    encoder_loss: Tensor  # backward through this gives the encoder gradient (τ treated as a constant)
    grad_tau: Tensor  # G_i, the τ_i-gradient (ρ − KL_i for the batch estimator); detached
    kl: Tensor  # KL(p_i ‖ uniform) with the batch softmax weights; detached
    log_u: Tensor  # the new log ū_i (log g_i for the batch estimator); detached: store it for the next visit


def simclr_margins(u_local: Tensor, candidates: Tensor, offset: int) -> Tuple[Tensor, Tensor]:
    """SimCLR margins h_ij = u_i·c_j − u_i·c_p(i) of the local anchors against the global batch.

    Args:
        u_local: (2n, D) L2-normalized local anchors [z1; z2] of this process (normalized by the caller).
        candidates: (C, D) the global batch in nt_xent's rank-major layout (rank r's block is [z1_r; z2_r]),
            C = 2n·W; u_local itself for one process.
        offset: where this process's anchors sit among the candidates (rank · 2n). Anchor i is candidate
            offset + i and its positive is candidate offset + (i + n) mod 2n, exactly as in nt_xent.

    Returns:
        ``(h, neg_mask)``, both (2n, C): h keeps the gradient to both inputs; ``neg_mask`` is True at the
        2n·W − 2 negatives of each row (every candidate but the anchor itself and its positive).
    """
    if u_local.ndim != 2 or u_local.shape[0] % 2 or u_local.shape[0] == 0:
        raise ValueError(f"u_local must have shape (2n, D) with n >= 1; got {tuple(u_local.shape)}")
    if candidates.ndim != 2 or candidates.shape[1] != u_local.shape[1]:
        raise ValueError(f"candidates must have shape (C, {u_local.shape[1]}); got {tuple(candidates.shape)}")
    two_n, num_candidates = u_local.shape[0], candidates.shape[0]
    if not 0 <= offset <= num_candidates - two_n:
        raise ValueError(f"offset={offset} must lie in [0, {num_candidates - two_n}] ({two_n} anchors, {num_candidates} candidates)")
    with torch.autocast(device_type=u_local.device.type, enabled=False):
        s = upcast(u_local) @ upcast(candidates).T  # 2n x C cosine similarities
        idx = torch.arange(two_n, device=u_local.device)
        positives = offset + (idx + two_n // 2) % two_n
        h = s - s.gather(1, positives[:, None])  # 2n x C; the positive's own margin is 0
        neg_mask = torch.ones_like(s, dtype=torch.bool)
        neg_mask[idx, idx + offset] = False
        neg_mask[idx, positives] = False
    return h, neg_mask


def moco_margins(q: Tensor, k: Tensor, queue: Tensor) -> Tensor:
    """MoCo v2 margins h_ij = q_i·n_j − q_i·k_i, shape (B, K), all entries valid negatives.

    ``q`` (B, D) keeps its gradient; the keys ``k`` (B, D) and the ``queue`` (K, D) are detached, as in MoCo.
    All three are expected L2-normalized (normalized by the caller).
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both have shape (B, D); got {tuple(q.shape)} and {tuple(k.shape)}")
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"queue must have shape (K, {q.shape[1]}); got {tuple(queue.shape)}")
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = upcast(q)
        pos = (q * upcast(k.detach())).sum(dim=1, keepdim=True)  # B x 1
        return q @ upcast(queue.detach()).T - pos  # B x K


def _check_robust_inputs(h: Tensor, tau: TauLike, rho: float, neg_mask: Optional[Tensor], log_u_prev: Optional[Tensor],
                         gamma: float, check_values: bool = True) -> None:
    if h.ndim != 2 or h.shape[0] == 0 or h.shape[1] == 0:
        raise ValueError(f"h must have shape (B, K) with B, K >= 1; got {tuple(h.shape)}")
    b = h.shape[0]
    if isinstance(tau, Tensor):
        if tau.ndim != 0 and tau.shape != (b,):
            raise ValueError(f"tau must be a scalar or have shape ({b},) (one per anchor); got {tuple(tau.shape)}")
        if check_values and not bool((tau > 0).all()):  # one host sync; a τ table is projected onto [τ_min, τ_max] anyway
            raise ValueError(f"tau must be > 0 everywhere; got min {float(tau.min())}")
    elif not float(tau) > 0:
        raise ValueError(f"tau={tau} must be > 0")
    if not rho >= 0:
        raise ValueError(f"rho={rho} must be >= 0")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma={gamma} must lie in (0, 1]")
    if neg_mask is not None:
        if neg_mask.shape != h.shape or neg_mask.dtype != torch.bool:
            raise ValueError(f"neg_mask must be a bool tensor of shape {tuple(h.shape)}; got {neg_mask.dtype} {tuple(neg_mask.shape)}")
        if check_values and not bool(neg_mask.any(dim=1).all()):  # one host sync
            raise ValueError("neg_mask leaves an anchor without negatives")
    if log_u_prev is not None and log_u_prev.shape != (b,):
        raise ValueError(f"log_u_prev must have shape ({b},); got {tuple(log_u_prev.shape)}")


def robust_terms(
    h: Tensor,
    tau: TauLike,
    rho: float,
    neg_mask: Optional[Tensor] = None,
    log_u_prev: Optional[Tensor] = None,
    gamma: float = 1.0,
    check_values: bool = True,
) -> RobustTerms:
    """Objective, encoder loss, τ-gradient, KL and log ū of the robust objective (module docstring).

    Args:
        h: (B, K) margins s_ij − s_i⁺ (from :func:`simclr_margins` or :func:`moco_margins`).
        tau: float, 0-d tensor or (B,) tensor of τ_i > 0. Detached here: τ does not depend on the encoder,
            and its gradient is returned as ``grad_tau`` rather than through autograd.
        rho: the KL radius ρ >= 0.
        neg_mask: optional (B, K) bool, True at the negatives of each row (m_i = its row count); None: all.
        log_u_prev: None for the batch estimator ū_i = g_i. Otherwise the (B,) stored log ū_i of these
            anchors, and ū_i ← (1 − γ) ū_i + γ g_i (SogCLR); an entry that is NaN or ±inf marks an anchor
            never seen, which takes ū_i = g_i (γ = 1 on the first visit, as LibAUC does). Initialize the
            table with −inf.
        gamma: the moving-average weight γ ∈ (0, 1] of the new batch estimate.
        check_values: also check τ > 0 and that every row has a negative (two host syncs); the training
            step passes False (its τ tables are projected onto [τ_min, τ_max], its masks built here).

    Returns:
        :class:`RobustTerms` of (B,) tensors in float32 (float64 for float64 ``h``). ``encoder_loss``:
        for the batch estimator it equals F_i and its h-gradient is exactly ∂F_i/∂h_ij = p_ij; with the
        estimator it is (1/m_i) Σ_j w_ij h_ij with the weights w_ij = exp(h_ij/τ_i) / ū_i detached.

    Example:
        >>> h = -torch.rand(4, 6)
        >>> t = robust_terms(h, 0.5, rho=0.1)
        >>> torch.allclose(t.grad_tau, 0.1 - t.kl, atol=1e-6)
        True
    """
    _check_robust_inputs(h, tau, rho, neg_mask, log_u_prev, gamma, check_values)
    with torch.autocast(device_type=h.device.type, enabled=False):
        h = upcast(h)
        tau = torch.as_tensor(tau.detach() if isinstance(tau, Tensor) else tau, dtype=h.dtype, device=h.device)
        tau = tau.expand(h.shape[0])  # (B,)
        mask = neg_mask if neg_mask is not None else torch.ones_like(h, dtype=torch.bool)
        log_m = mask.sum(dim=1).to(h.dtype).log()  # (B,) log m_i
        z = (h / tau[:, None]).masked_fill(~mask, float("-inf"))  # B x K scaled margins, −inf off the negatives
        lse = torch.logsumexp(z, dim=1)  # (B,)
        log_g = lse - log_m
        log_p = z.detach() - lse.detach()[:, None]  # B x K log-softmax over the negatives, −inf off them
        p = log_p.exp()
        # Σ p log(m p), not Σ p h/τ − log g: the latter cancels two numbers of size h/τ (~200 at τ = 0.01).
        kl = log_m + (p * log_p.masked_fill(~mask, 0.0)).sum(dim=1)
        if log_u_prev is None:
            log_u = log_g.detach()
            grad_tau = rho - kl
            encoder_loss = tau * log_g + rho * tau  # = F_i, and d/dh_ij = p_ij (τ a constant)
        else:
            prev = upcast(log_u_prev.detach()).to(h.dtype)
            log_keep = math.log(1.0 - gamma) if gamma < 1 else float("-inf")
            mixed = torch.logaddexp(prev + log_keep, log_g.detach() + math.log(gamma))
            log_u = torch.where(torch.isfinite(prev), mixed, log_g.detach())
            d = log_u - log_g.detach()  # log(ū_i / g_i); exp(−d) <= 1/γ as ū_i >= γ g_i: no overflow
            # G = log ū + ρ − (g/ū) Σ_j p_ij h_ij/τ_i with Σ_j p_ij h_ij/τ_i = KL + log g, regrouped so that
            # d = 0 (first visit) gives exactly ρ − KL and no two numbers of size h/τ cancel.
            grad_tau = rho - (-d).exp() * kl + d - torch.expm1(-d) * log_g.detach()
            weights = p * (-d).exp()[:, None]  # B x K: w_ij / m_i = exp(h_ij/τ_i) / (m_i ū_i), detached
            encoder_loss = (weights * h.masked_fill(~mask, 0.0)).sum(dim=1)  # d/dh_ij = w_ij / m_i
        objective = tau * log_u + rho * tau
    return RobustTerms(objective.detach(), encoder_loss, grad_tau, kl, log_u)


def tau_momentum_step(
    tau: Tensor, momentum: Tensor, grad: Tensor, eta: float, beta: float, tau_min: float, tau_max: float
) -> Tuple[Tensor, Tensor]:
    """One projected momentum step on τ (iSogCLR, Alg. 1):

        m ← (1 − β) m + β G ;   τ ← clamp(τ − η m, τ_min, τ_max)

    ``tau``, ``momentum`` and ``grad`` share one shape (per-anchor tables indexed by the batch, or 0-d for a
    global τ with G averaged by the caller). Returns new tensors ``(tau_new, momentum_new)``, detached; the
    caller writes them back into its tables.
    """
    if tau.shape != momentum.shape or tau.shape != grad.shape:
        raise ValueError(f"tau, momentum and grad must share one shape; got {tuple(tau.shape)}, {tuple(momentum.shape)}, {tuple(grad.shape)}")
    if not eta > 0:
        raise ValueError(f"eta={eta} must be > 0")
    if not 0 < beta <= 1:
        raise ValueError(f"beta={beta} must lie in (0, 1]")
    if not 0 < tau_min <= tau_max:
        raise ValueError(f"need 0 < tau_min <= tau_max; got tau_min={tau_min}, tau_max={tau_max}")
    with torch.no_grad():
        momentum_new = (1 - beta) * momentum + beta * grad.to(momentum.dtype)
        tau_new = (tau - eta * momentum_new.to(tau.dtype)).clamp(tau_min, tau_max)
    return tau_new, momentum_new
