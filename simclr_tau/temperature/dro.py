"""τ trained by the robust (DRO) objective instead of the contrastive loss: iSogCLR's per-sample τ_i, one
global τ, and the SogCLR moving-average estimator of each anchor's partition function.

Why: a τ that descends the contrastive loss itself falls for as long as positives score above negatives
(measured here: 0.2 → 0.006 in 24 Fashion-MNIST epochs). The robust objective (Qiu et al., ICML 2023,
arXiv 2305.11965) gives τ its own objective, F_i(τ_i) = τ_i log E_j exp(h_ij/τ_i) + ρ τ_i, whose τ-gradient
ρ − KL(p_i ‖ uniform) vanishes at an interior point for any ρ < log(#negatives): τ cannot run to 0.
The formulas are :mod:`simclr_tau.losses.dro`; this module holds the state and its updates.

State (all buffers on the training device, saved in checkpoints, sized from the dataset; no host copy per
step): ``tau`` ((N,) per image, or 0-d), ``momentum`` (its τ-gradient moving average, same shape), and for
``estimator="sogclr"`` ``log_u`` (N,) with ``seen`` (N,) bool (an image not seen yet takes ū = g, γ = 1).
Both views of image n are anchors with the same τ_n; G_n is the mean of its anchors' G and the stored ū_n
the mean of their updated ū (SogCLR's unimodal code averages the two views' estimates likewise).

Processes: every process keeps the full tables. :meth:`update` all-gathers (index, G, log ū) of the local
anchors, so every process writes every row of the global batch once; the tables stay identical (so
DDP's buffer broadcast from rank 0 is a no-op on them, as for MoCo's queue) and a 2-process run equals a
1-process run of the same global batch.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from simclr_tau.distributed import all_gather_no_grad
from simclr_tau.losses.dro import RobustTerms, robust_terms, tau_momentum_step
from simclr_tau.temperature.modules import Temperature


def gamma_at(step: int, gamma: float, schedule: str, decay_steps: int) -> float:
    """SogCLR's γ at ``step``: constant, or cosine from 1 down to ``gamma`` over ``decay_steps`` (LibAUC)."""
    if schedule == "constant":
        return gamma
    t = min(step, decay_steps) / max(decay_steps, 1)
    return gamma + (1.0 - gamma) * 0.5 * (1.0 + math.cos(math.pi * t))


class DROTemperature(Temperature):
    """τ by projected momentum steps on the robust objective's τ-gradient (iSogCLR, Alg. 1).

    ``forward(embeddings, index)`` returns τ of the batch's images: a 0-d tensor (global) or (n,) rows of
    the table (``per_sample``), detached (no autograd path: τ moves in :meth:`update` only).

    Example:
        >>> t = DROTemperature(num_samples=10, init=0.1, per_sample=True)
        >>> t(index=torch.tensor([3, 7])).tolist()
        [0.10000000149011612, 0.10000000149011612]
    """

    objective = "dro"

    def __init__(self, num_samples: int, init: float = 0.1, tau_min: float = 0.05, tau_max: float = 0.7,
                 rho: float = 0.3, eta: float = 0.01, beta: float = 0.9, per_sample: bool = False,
                 estimator: str = "batch", gamma: float = 0.9, gamma_schedule: str = "constant",
                 gamma_decay_steps: int = 1) -> None:
        super().__init__()
        if not 0 < tau_min <= init <= tau_max:
            raise ValueError(f"need 0 < tau_min={tau_min} <= init={init} <= tau_max={tau_max}")
        if estimator not in ("batch", "sogclr"):
            raise ValueError(f"temperature.dro.estimator={estimator!r}; accepted: batch, sogclr")
        if (per_sample or estimator == "sogclr") and num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: per-sample tables need the dataset size")
        self.per_sample, self.estimator = per_sample, estimator
        self.tau_min, self.tau_max, self.rho, self.eta, self.beta = tau_min, tau_max, rho, eta, beta
        self.gamma, self.gamma_schedule, self.gamma_decay_steps = gamma, gamma_schedule, gamma_decay_steps
        self.loss_scale = float(init)  # the encoder loss is F / τ_0: NT-Xent's gradient scale at τ = τ_0
        shape = (num_samples,) if per_sample else ()
        self.register_buffer("tau", torch.full(shape, float(init)))
        self.register_buffer("momentum", torch.zeros(shape))
        if estimator == "sogclr":
            self.register_buffer("log_u", torch.zeros(num_samples))
            self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool))
        self.gamma_now = self._gamma(0)  # a float: a function of the step, set by step() (no device read)
        self.register_buffer("last_kl", torch.zeros(()), persistent=False)  # batch mean KL(p ‖ U), for logs

    def _gamma(self, step: int) -> float:
        return gamma_at(step, self.gamma, self.gamma_schedule, self.gamma_decay_steps) if self.estimator == "sogclr" else 1.0

    def step(self, global_step: int) -> None:
        self.gamma_now = self._gamma(global_step)

    def forward(self, embeddings: Optional[Tensor] = None, index: Optional[Tensor] = None,
                alignment: Optional[Tensor] = None) -> Tensor:
        if not self.per_sample:
            return self.tau.clone()  # a copy: update() writes the buffer in place while autograd may hold τ
        if index is None:
            raise ValueError("a per-sample dro τ needs the dataset indices of the batch (index=...)")
        return self.tau[index]

    def log_u_of(self, index: Optional[Tensor], views: int) -> Optional[Tensor]:
        """The stored log ū of each anchor (views × n, view-major), −inf where never seen; None: batch."""
        if self.estimator != "sogclr":
            return None
        if index is None:
            raise ValueError("the sogclr estimator needs the dataset indices of the batch (index=...)")
        return self.log_u[index].masked_fill(~self.seen[index], float("-inf")).repeat(views)

    @torch.no_grad()
    def update(self, index: Optional[Tensor], terms: RobustTerms, views: int) -> None:
        """Write the batch's τ step (and ū) into the state, on every process (module docstring)."""
        n = terms.grad_tau.shape[0] // views
        g = terms.grad_tau.view(views, n).mean(0)  # (n,) G of each image: the mean over its anchors
        self.last_kl.copy_(terms.kl.mean())
        if self.per_sample or self.estimator == "sogclr":
            if index is None:
                raise ValueError("per-sample dro state needs the dataset indices of the batch (index=...)")
            log_u = torch.logsumexp(terms.log_u.view(views, n), dim=0) - math.log(views)  # mean of the views' ū
            idx, g_all, log_u_all = (all_gather_no_grad(t) for t in (index, g, log_u))
        else:
            g_all = all_gather_no_grad(g)
        if self.per_sample:
            tau, m = tau_momentum_step(self.tau[idx], self.momentum[idx], g_all, self.eta, self.beta,
                                       self.tau_min, self.tau_max)
            self.tau.index_copy_(0, idx, tau)
            self.momentum.index_copy_(0, idx, m)
        else:
            tau, m = tau_momentum_step(self.tau, self.momentum, g_all.mean(), self.eta, self.beta,
                                       self.tau_min, self.tau_max)
            self.tau.copy_(tau)
            self.momentum.copy_(m)
        if self.estimator == "sogclr":
            self.log_u.index_copy_(0, idx, log_u_all.to(self.log_u.dtype))
            self.seen[idx] = True

    @torch.no_grad()
    def log_stats(self) -> Dict[str, Tensor]:
        """State statistics for a log step (0-d tensors; the caller reads them): τ quantiles over the images
        seen so far, the fraction at either bound, the last batch's mean KL, ū statistics."""
        out: Dict[str, Tensor] = {"dro_kl": self.last_kl.clone()}
        if self.per_sample:
            visited = self.momentum != 0  # a row that has taken a step (an exact 0 G is a measure-zero event)
            tau = self.tau[visited] if bool(visited.any()) else self.tau
            q = torch.quantile(tau.float(), torch.tensor([0.01, 0.5, 0.99], device=tau.device))
            out.update(tau_p1=q[0], tau_p50=q[1], tau_p99=q[2],
                       tau_at_min=(tau <= self.tau_min * (1 + 1e-6)).float().mean(),
                       tau_at_max=(tau >= self.tau_max * (1 - 1e-6)).float().mean())
        else:
            out.update(tau_at_min=(self.tau <= self.tau_min * (1 + 1e-6)).float(),
                       tau_at_max=(self.tau >= self.tau_max * (1 - 1e-6)).float())
        if self.estimator == "sogclr":
            lu = self.log_u[self.seen] if bool(self.seen.any()) else self.log_u
            out.update(log_u_mean=lu.mean(), log_u_min=lu.min(), log_u_max=lu.max(), gamma=torch.tensor(self.gamma_now))
        return out


def robust_loss(temperature: Temperature, h: Tensor, neg_mask: Optional[Tensor], tau: Tensor,
                index: Optional[Tensor], views: int) -> Tuple[Tensor, Dict[str, Tensor]]:
    """The encoder loss of the robust objective for ``temperature.objective == "dro"``, and its τ update.

    ``h`` (A, K) margins of the A = views × n local anchors (view-major), ``tau`` their τ (0-d or (A,)).
    Encoder: mean_i F_i / τ_0 with τ detached (F's encoder gradient Σ_j p_ij ∇h_ij, scaled by 1/τ_0 so that
    a learning rate tuned for NT-Xent at τ_0 carries over). A τ with an autograd path (a TempNet-style τ
    network, ``mode=conditional, objective=dro``) gets mean_i G_i·τ_i added, whose gradient is
    mean_i (∂F_i/∂τ_i)·∂τ_i/∂θ: the network descends the robust objective, not the contrastive loss.
    A :class:`DROTemperature` takes its projected momentum step in :meth:`DROTemperature.update`.
    """
    rho = float(getattr(temperature, "rho"))
    scale = float(getattr(temperature, "loss_scale"))
    is_dro = isinstance(temperature, DROTemperature)
    log_u_prev = temperature.log_u_of(index, views) if is_dro else None
    gamma = temperature.gamma_now if is_dro and log_u_prev is not None else 1.0
    tau_anchor = tau.repeat(views) if (tau.ndim == 1 and tau.shape[0] * views == h.shape[0]) else tau
    terms = robust_terms(h, tau_anchor.detach(), rho, neg_mask, log_u_prev, gamma, check_values=False)
    loss = terms.encoder_loss.mean() / scale
    if tau_anchor.requires_grad:
        loss = loss + (terms.grad_tau * tau_anchor).mean()
    if is_dro:
        temperature.update(index, terms, views)
    logs = {"dro_objective": terms.objective.mean(), "dro_kl": terms.kl.mean()}
    return loss, logs
