"""Temperature: modules (fixed / learnable / conditional / scheduled / adaptive / dro) and per-step schedules."""

from __future__ import annotations

from typing import Any

from simclr_tau.config import AdaptiveConfig, DROConfig, ScheduleConfig, TemperatureConfig, validate_temperature
from simclr_tau.config.resolve import tau_bounds
from simclr_tau.temperature.dro import DROTemperature, robust_loss
from simclr_tau.temperature.modules import (
    AdaptiveTemperature,
    ConditionalTemperature,
    FixedTemperature,
    LearnableTemperature,
    ScheduledTemperature,
    Temperature,
)
from simclr_tau.temperature.schedules import Schedule, build_schedule

__all__ = [
    "Temperature",
    "FixedTemperature",
    "LearnableTemperature",
    "ConditionalTemperature",
    "ScheduledTemperature",
    "DROTemperature",
    "AdaptiveTemperature",
    "robust_loss",
    "Schedule",
    "build_schedule",
    "build_temperature",
]


def build_temperature(
    cfg: Any, embed_dim: int, steps_per_epoch: int = 1, total_steps: int = 1, prefix: str = "temperature",
    num_samples: int = 0,
) -> Temperature:
    """Build the temperature module a :class:`~simclr_tau.config.TemperatureConfig` describes.

    ``embed_dim`` is the width of the embeddings a conditional τ reads; the step counts size schedules;
    ``num_samples`` (the training set's size) sizes the per-sample tables of a dro τ.
    Raises :class:`~simclr_tau.errors.UserError` naming the field for an invalid config.
    """
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        if isinstance(cfg.get("schedule"), dict):  # a nested plain dict, as in the YAML
            cfg["schedule"] = ScheduleConfig(**cfg["schedule"])
        for key, kind in (("dro", DROConfig), ("adaptive", AdaptiveConfig)):
            if isinstance(cfg.get(key), dict):
                cfg[key] = kind(**cfg[key])
        cfg = TemperatureConfig(**cfg)
    validate_temperature(cfg, prefix)
    if cfg.mode == "fixed":
        return FixedTemperature(cfg.init)
    if cfg.mode == "learnable":
        return LearnableTemperature(cfg.init, cfg.parametrization, cfg.eps, cfg.tau_min, cfg.tau_max)
    if cfg.mode == "conditional":
        lo, hi = tau_bounds(cfg)
        return ConditionalTemperature(embed_dim, cfg.init, lo, hi, cfg.hidden_dim, cfg.depth, cfg.detach_input,
                                      cfg.objective, cfg.dro.rho)
    if cfg.mode == "dro":
        d = cfg.dro
        decay = d.gamma_decay_epochs
        lo, hi = tau_bounds(cfg)
        return DROTemperature(num_samples, cfg.init, lo, hi, d.rho, d.eta, d.beta,
                              d.per_sample, d.estimator, d.gamma, d.gamma_schedule,
                              int(round(decay * steps_per_epoch)) if decay is not None else total_steps)
    if cfg.mode == "adaptive":
        return AdaptiveTemperature(cfg.init, cfg.adaptive.alpha, cfg.adaptive.a0, cfg.tau_min, cfg.tau_max)
    return ScheduledTemperature(build_schedule(cfg.schedule, steps_per_epoch, total_steps, f"{prefix}.schedule"))
