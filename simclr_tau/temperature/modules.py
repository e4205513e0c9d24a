"""Temperature modules: where every τ in this project comes from.

Every module is an ``nn.Module`` whose ``forward(embeddings=None)`` returns a positive τ: a 0-d tensor
(fixed, learnable, scheduled) or one τ per row of ``embeddings`` (conditional). Positivity holds by
construction, never by a clamp that could silently break the gradient.

- :class:`FixedTemperature`: a constant buffer.
- :class:`LearnableTemperature`: one parameter θ, τ = g(θ) with g one of
  ``log`` (τ = exp θ, as CLIP's logit scale), ``softplus`` (τ = softplus(θ) + ε) or ``relu``
  (τ = relu(θ) + ε). Optional bounds [τ_min, τ_max] are enforced by *projection* after each optimizer
  step (:meth:`project_`, like open_clip clamping its logit scale): the forward pass is the exact,
  unclamped g(θ), so the gradient is alive everywhere inside the bounds.
- :class:`ConditionalTemperature`: an MLP predicts τ_i = τ_min + (τ_max − τ_min)·sigmoid(h(z_i)) per sample
  from the L2-normalized projection output z_i (as in TaU, Zhang et al. 2021, "Temperature as
  Uncertainty for Unsupervised Learning"). By default the input is detached, so the τ head cannot reshape
  the embedding to game its own temperature; the encoder then learns from the loss exactly as with a
  fixed per-sample τ.
- :class:`ScheduledTemperature`: τ follows a :class:`~simclr_tau.temperature.schedules.Schedule` per step.

Parameters under a module named ``temperature`` go to their own optimizer group (:func:`simclr_tau.train.optim.param_groups`) so the
optimizer gives them their own learning rate and no weight decay.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from simclr_tau.temperature.schedules import Schedule


class Temperature(nn.Module):
    """Base class. ``forward(embeddings, index, alignment)`` returns τ (0-d, or shape (B,) for per-sample τ).

    The method passes what a τ may read: ``embeddings`` (the projections, conditional τ), ``index`` (the
    batch's dataset indices, per-sample tables of :mod:`simclr_tau.temperature.dro`) and ``alignment`` (the
    batch mean of the detached positive cosines, adaptive τ); each module reads what it needs.
    ``objective`` says what trains τ: ``contrastive`` (the loss itself, through autograd) or ``dro``
    (:func:`simclr_tau.temperature.dro.robust_loss`).
    """

    per_sample: bool = False
    objective: str = "contrastive"
    reads_alignment: bool = False  # True: the method must pass ``alignment`` (computed only then)

    def forward(self, embeddings: Optional[Tensor] = None, index: Optional[Tensor] = None,
                alignment: Optional[Tensor] = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self, global_step: int) -> None:
        """Called once before every optimizer step with the 0-based step index (schedules)."""

    def project_(self) -> None:
        """Called after every optimizer step (bounded learnable τ)."""

    def observe(self, metric: float) -> None:
        """Feed a monitored metric (plateau schedules)."""

    def health(self) -> Optional[str]:
        """A message when τ is stuck in a state training cannot leave, else None (read at log steps only)."""
        return None

    def log_stats(self) -> Dict[str, Tensor]:
        """Statistics of the module's state for a log step (0-d tensors), e.g. per-sample τ quantiles."""
        return {}

    @torch.no_grad()
    def stats(self, tau: Tensor) -> Dict[str, Tensor]:
        """Logging statistics of a τ returned by ``forward`` (tensors: read them at log time only)."""
        tau = tau.detach().float()
        if tau.ndim == 0:
            return {"tau": tau}
        return {"tau_mean": tau.mean(), "tau_min": tau.min(), "tau_max": tau.max(), "tau_std": tau.std(unbiased=False)}


class FixedTemperature(Temperature):
    """A constant τ (a buffer, so it is saved with the model but never trained)."""

    def __init__(self, tau: float) -> None:
        super().__init__()
        if not tau > 0:
            raise ValueError(f"temperature.init={tau} must be > 0")
        self.register_buffer("tau", torch.tensor(float(tau)))

    def forward(self, embeddings: Optional[Tensor] = None, index: Optional[Tensor] = None,
                alignment: Optional[Tensor] = None) -> Tensor:
        return self.tau


_PARAMETRIZATIONS = ("log", "softplus", "relu")


class LearnableTemperature(Temperature):
    """A learnable scalar τ = g(θ); see the module docstring for g and the bound projection.

    Example:
        >>> t = LearnableTemperature(0.07, "softplus")
        >>> round(float(t()), 6)
        0.07
    """

    def __init__(
        self,
        init: float,
        parametrization: str = "log",
        eps: float = 1e-3,
        tau_min: Optional[float] = None,
        tau_max: Optional[float] = None,
    ) -> None:
        super().__init__()
        if parametrization not in _PARAMETRIZATIONS:
            raise ValueError(f"temperature.parametrization={parametrization!r}; accepted: {', '.join(_PARAMETRIZATIONS)}")
        if not init > 0:
            raise ValueError(f"temperature.init={init} must be > 0")
        if parametrization != "log" and not init > eps:
            raise ValueError(f"temperature.init={init} must be > temperature.eps={eps} for '{parametrization}'")
        if tau_min is not None and tau_max is not None and not tau_min < tau_max:
            raise ValueError(f"temperature.tau_min={tau_min} must be < temperature.tau_max={tau_max}")
        lo = tau_min if tau_min is not None else (0.0 if parametrization == "log" else eps)
        if tau_min is not None and parametrization != "log" and tau_min < eps:
            raise ValueError(f"temperature.tau_min={tau_min} must be >= temperature.eps={eps} for '{parametrization}'")
        if init < lo or (tau_max is not None and init > tau_max):
            raise ValueError(f"temperature.init={init} lies outside [tau_min, tau_max]=[{tau_min}, {tau_max}]")
        self.parametrization = parametrization
        self.eps = float(eps)
        self.tau_min = tau_min
        self.tau_max = tau_max
        self.theta = nn.Parameter(torch.tensor(self._inverse(float(init))))

    def _inverse(self, tau: float) -> float:
        """θ such that g(θ) = τ."""
        if self.parametrization == "log":
            return math.log(tau)
        if self.parametrization == "softplus":
            return math.log(math.expm1(tau - self.eps))
        return tau - self.eps

    def forward(self, embeddings: Optional[Tensor] = None, index: Optional[Tensor] = None,
                alignment: Optional[Tensor] = None) -> Tensor:
        if self.parametrization == "log":
            return self.theta.exp()
        if self.parametrization == "softplus":
            return F.softplus(self.theta) + self.eps
        return F.relu(self.theta) + self.eps

    def health(self) -> Optional[str]:
        """relu's dead zone: once θ ≤ 0, τ = ε and dτ/dθ = 0, so no gradient can ever move τ again.

        The τ study saw exactly this: relu's τ rose to ~8 in the first steps, then fell through 0 to
        ε = 1e-3 for the rest of the run (kNN 69 % vs 84 % for log / softplus). A host sync: call it at
        log steps only.
        """
        if self.parametrization != "relu" or float(self.theta.detach()) > 0:
            return None
        bound = f"temperature.tau_min={self.tau_min} " if self.tau_min is not None else ""
        return (f"learnable τ (relu parametrization) is stuck at its floor eps={self.eps:g}: relu's gradient is 0 "
                f"for θ ≤ 0, so τ can no longer change. {bound}Set temperature.tau_min > eps (e.g. 0.01, "
                f"CLIP's bound) to keep θ > 0, or use temperature.parametrization=log|softplus")

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp θ so that g(θ) stays in [τ_min, τ_max] (projected gradient descent)."""
        lo = self._inverse(self.tau_min) if self.tau_min is not None else None
        hi = self._inverse(self.tau_max) if self.tau_max is not None else None
        if lo is not None or hi is not None:
            self.theta.clamp_(min=lo, max=hi)


class ConditionalTemperature(Temperature):
    """Per-sample τ_i = τ_min + (τ_max − τ_min)·sigmoid(MLP(z_i)), from embeddings z of shape (B, D).

    The MLP's last layer starts at zero weight and a bias that gives τ_init for every sample, so training
    starts exactly like a fixed τ = ``init``.
    """

    per_sample = True

    def __init__(
        self,
        in_dim: int,
        init: float = 0.1,
        tau_min: float = 0.05,
        tau_max: float = 1.0,
        hidden_dim: int = 128,
        depth: int = 2,
        detach_input: bool = True,
        objective: str = "contrastive",
        rho: float = 0.3,
    ) -> None:
        super().__init__()
        if objective not in ("contrastive", "dro"):
            raise ValueError(f"temperature.objective={objective!r}; accepted: contrastive, dro")
        self.objective = objective  # dro: TempNet (Qiu et al. 2024): the head descends the robust objective
        self.rho, self.loss_scale = float(rho), float(init)
        if not 0 < tau_min < tau_max:
            raise ValueError(f"temperature bounds must satisfy 0 < tau_min={tau_min} < tau_max={tau_max}")
        if not tau_min < init < tau_max:
            raise ValueError(f"temperature.init={init} must lie strictly inside (tau_min, tau_max)=({tau_min}, {tau_max})")
        if depth < 1 or hidden_dim < 1:
            raise ValueError(f"temperature.depth={depth} and temperature.hidden_dim={hidden_dim} must be >= 1")
        layers: List[nn.Module] = []
        d = in_dim
        for _ in range(depth - 1):
            layers += [nn.Linear(d, hidden_dim), nn.ReLU(inplace=True)]
            d = hidden_dim
        last = nn.Linear(d, 1)
        nn.init.zeros_(last.weight)
        frac = (init - tau_min) / (tau_max - tau_min)
        nn.init.constant_(last.bias, math.log(frac / (1 - frac)))  # sigmoid(bias) = frac
        layers.append(last)
        self.mlp = nn.Sequential(*layers)
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.detach_input = detach_input

    def forward(self, embeddings: Optional[Tensor] = None, index: Optional[Tensor] = None,
                alignment: Optional[Tensor] = None) -> Tensor:
        if embeddings is None or embeddings.ndim != 2:
            raise ValueError("ConditionalTemperature needs embeddings of shape (B, D)")
        # The head's own precision (float32, or float64 after .double()), whatever the embeddings' dtype.
        x = F.normalize(embeddings.to(self.mlp[0].weight.dtype), dim=1)
        if self.detach_input:
            x = x.detach()
        # A tiny head: run it outside autocast so τ keeps full precision (bf16 would round τ by ~0.4%).
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = self.mlp(x).squeeze(1)  # (B,)
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(h)


class ScheduledTemperature(Temperature):
    """τ = schedule(step), held in a buffer updated by :meth:`step` (no gradient, no host sync in forward)."""

    def __init__(self, schedule: Schedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("tau", torch.tensor(float(schedule(0))))

    def forward(self, embeddings: Optional[Tensor] = None, index: Optional[Tensor] = None,
                alignment: Optional[Tensor] = None) -> Tensor:
        return self.tau

    def step(self, global_step: int) -> None:
        self.tau.fill_(self.schedule(global_step))

    def observe(self, metric: float) -> None:
        self.schedule.observe(metric)

    # Plateau state travels with the module's state_dict, so checkpoints restore it.
    def get_extra_state(self) -> Dict[str, Any]:
        return self.schedule.state_dict()

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.schedule.load_state_dict(state)


class AdaptiveTemperature(Temperature):
    """MACL's model-aware τ (Huang et al., ICML 2023, "Model-Aware Contrastive Learning"), parameter-free:

        τ = τ_0 · (1 + α · (A − A_0)),   A = mean_i cos(z_i, z_i⁺) of the batch, detached

    so τ rises as the positives align (a uniformity-tolerance trade-off that follows training). Only MACL's
    temperature, not its loss reweighting. Clamped to [τ_min, τ_max] when given. The method passes A as
    ``alignment`` (0-d); τ is 0-d.
    """

    reads_alignment = True

    def __init__(self, init: float, alpha: float = 0.5, a0: float = 0.0, tau_min: Optional[float] = None,
                 tau_max: Optional[float] = None) -> None:
        super().__init__()
        if not init > 0 or not alpha >= 0:
            raise ValueError(f"adaptive τ needs init > 0 and alpha >= 0; got init={init}, alpha={alpha}")
        self.init, self.alpha, self.a0 = float(init), float(alpha), float(a0)
        self.tau_min = tau_min if tau_min is not None else 1e-3  # A ∈ [−1, 1]: α > 1/(1 + A_0) could reach 0
        self.tau_max = tau_max

    def forward(self, embeddings: Optional[Tensor] = None, index: Optional[Tensor] = None,
                alignment: Optional[Tensor] = None) -> Tensor:
        if alignment is None:
            raise ValueError("an adaptive (MACL) τ needs the batch's positive alignment (alignment=...)")
        tau = self.init * (1.0 + self.alpha * (alignment.detach().float() - self.a0))
        return tau.clamp(min=self.tau_min, max=self.tau_max)
