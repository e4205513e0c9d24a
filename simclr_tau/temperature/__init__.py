"""Temperature: modules (fixed / learnable / conditional / scheduled) and per-step schedules."""

from __future__ import annotations

from typing import Any

from simclr_tau.config import ScheduleConfig, TemperatureConfig, validate_temperature
from simclr_tau.temperature.modules import (
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
    "Schedule",
    "build_schedule",
    "build_temperature",
]


def build_temperature(
    cfg: Any, embed_dim: int, steps_per_epoch: int = 1, total_steps: int = 1, prefix: str = "temperature"
) -> Temperature:
    """Build the temperature module a :class:`~simclr_tau.config.TemperatureConfig` describes.

    ``embed_dim`` is the width of the embeddings a conditional τ reads; the step counts size schedules.
    Raises :class:`~simclr_tau.errors.UserError` naming the field for an invalid config.
    """
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        if isinstance(cfg.get("schedule"), dict):  # a nested plain dict, as in the YAML
            cfg["schedule"] = ScheduleConfig(**cfg["schedule"])
        cfg = TemperatureConfig(**cfg)
    validate_temperature(cfg, prefix)
    if cfg.mode == "fixed":
        return FixedTemperature(cfg.init)
    if cfg.mode == "learnable":
        return LearnableTemperature(cfg.init, cfg.parametrization, cfg.eps, cfg.tau_min, cfg.tau_max)
    if cfg.mode == "conditional":
        lo = cfg.tau_min if cfg.tau_min is not None else 0.05
        hi = cfg.tau_max if cfg.tau_max is not None else 1.0
        return ConditionalTemperature(embed_dim, cfg.init, lo, hi, cfg.hidden_dim, cfg.depth, cfg.detach_input)
    return ScheduledTemperature(build_schedule(cfg.schedule, steps_per_epoch, total_steps, f"{prefix}.schedule"))
