"""Per-step schedules: one mechanism for the contrastive τ, the distillation T and the sampling T.

A schedule maps an optimizer step to a value. Epoch-valued knobs are converted with
``steps_per_epoch``; ``e = step / steps_per_epoch`` is the (fractional) epoch.

- constant:     v(e) = start
- linear:       v(e) = start + (end - start) · min(e / E, 1),  E = total epochs
- cosine:       v(e) = end + ½(start - end)(1 + cos(2π e / P))   (Kukleva et al., ICLR 2023,
                "Temperature Schedules for Self-Supervised Contrastive Methods on Long-Tail Data";
                start = τ_max, end = τ_min, period P; P = 2E gives one monotone decay start -> end)
- exponential:  v(e) = max(end, start · gamma^e)
- step:         v(e) = max(end, start · gamma^floor(e / every_epochs))
- plateau:      v = max(end, start · gamma^drops), one more drop after ``patience`` evaluations without
                improvement of the monitored metric (like ReduceLROnPlateau, for τ)
- warm-up (any kind): linear from ``warmup_start`` to v(warmup_epochs) over the first warmup epochs.

Stateless schedules are pure functions of the step; ``plateau`` carries state, saved by
:meth:`Schedule.state_dict` and restored by :meth:`Schedule.load_state_dict`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from simclr_tau.config import ScheduleConfig, validate_schedule


class Schedule:
    """A value per optimizer step, built from a :class:`~simclr_tau.config.ScheduleConfig`.

    Example:
        >>> s = Schedule(ScheduleConfig(kind="step", start=1.0, end=0.1, gamma=0.5, every_epochs=2), 10, 100)
        >>> s(0), s(25)
        (1.0, 0.5)
    """

    def __init__(self, cfg: Any, steps_per_epoch: int, total_steps: int, prefix: str = "schedule") -> None:
        validate_schedule(cfg, prefix)
        if steps_per_epoch < 1 or total_steps < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} and total_steps={total_steps} must be >= 1")
        self.cfg = cfg
        self.steps_per_epoch = steps_per_epoch
        self.total_epochs = total_steps / steps_per_epoch
        # Plateau state: number of drops, best metric so far, evaluations since the best.
        self.drops = 0
        self.best: Optional[float] = None
        self.bad_evals = 0

    def _base(self, e: float) -> float:
        c = self.cfg
        if c.kind == "constant":
            return c.start
        if c.kind == "linear":
            frac = min(e / self.total_epochs, 1.0)
            return c.start + (c.end - c.start) * frac
        if c.kind == "cosine":
            period = c.period_epochs if c.period_epochs is not None else 2.0 * self.total_epochs
            return c.end + 0.5 * (c.start - c.end) * (1.0 + math.cos(2.0 * math.pi * e / period))
        if c.kind == "exponential":
            return max(c.end, c.start * c.gamma**e)
        if c.kind == "step":
            return max(c.end, c.start * c.gamma ** math.floor(e / c.every_epochs + 1e-9))
        if c.kind == "plateau":
            return max(c.end, c.start * c.gamma**self.drops)
        raise ValueError(f"unknown schedule kind {c.kind!r}")

    def __call__(self, step: int) -> float:
        """The value at optimizer step ``step`` (0-based)."""
        e = step / self.steps_per_epoch
        w = self.cfg.warmup_epochs
        if w > 0 and e < w:
            start = self.cfg.warmup_start if self.cfg.warmup_start is not None else self.cfg.start
            target = self._base(w)
            return start + (target - start) * (e / w)
        return self._base(e)

    def observe(self, metric: float) -> bool:
        """Feed a monitored metric (plateau only; others ignore it). Returns True if the value dropped."""
        if self.cfg.kind != "plateau":
            return False
        better = self.best is None or (metric > self.best if self.cfg.monitor_mode == "max" else metric < self.best)
        if better:
            self.best, self.bad_evals = float(metric), 0
            return False
        self.bad_evals += 1
        if self.bad_evals >= self.cfg.patience:
            self.drops += 1
            self.bad_evals = 0
            return True
        return False

    def state_dict(self) -> Dict[str, Any]:
        return {"drops": self.drops, "best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.drops = int(state["drops"])
        self.best = None if state["best"] is None else float(state["best"])
        self.bad_evals = int(state["bad_evals"])


def build_schedule(cfg: Any, steps_per_epoch: int, total_steps: int, prefix: str = "schedule") -> Schedule:
    """Build a :class:`Schedule`; ``cfg`` may be a ScheduleConfig, a DictConfig or a plain dict."""
    if isinstance(cfg, dict):
        cfg = ScheduleConfig(**cfg)
    return Schedule(cfg, steps_per_epoch, total_steps, prefix)
