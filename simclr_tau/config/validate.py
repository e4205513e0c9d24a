"""Checking a loaded config: every field against its rule (:mod:`~simclr_tau.config.ranges`), then what holds
between fields (``tau_min < tau_max``, a batch divisible by the accumulation steps, a method and a τ that fit).
A refusal is a :class:`~simclr_tau.config.ranges.ConfigError` (a :class:`UserError`) naming ``section.key``,
the value and what is accepted.

:func:`check_run_environment` holds the checks that depend on the machine rather than on the config (fp16
needs a GPU, the output directory must be writable): a run calls it when it starts; loading a run's config
elsewhere (an evaluation on another machine) does not.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from simclr_tau.config.ranges import (DATASETS, SCHEDULE_KINDS, TEMPERATURE_MODES, ConfigError, OneOf,
                                      check_fields)
from simclr_tau.config.schema import (Config, DataConfig, DistillConfig, ScheduleConfig, TemperatureConfig)
from simclr_tau.errors import UserError

__all__ = ["DATASETS", "SCHEDULE_KINDS", "TEMPERATURE_MODES", "METHODS", "DISTILL_METHODS", "PARAMETRIZATIONS",
           "check_run_environment", "validate", "validate_distill", "validate_schedule", "validate_temperature"]

PARAMETRIZATIONS = ("log", "softplus", "relu")
DRO_TAU_MIN, DRO_TAU_MAX = 0.05, 0.7  # iSogCLR's image bounds: the dro mode's defaults
CONDITIONAL_TAU_MIN, CONDITIONAL_TAU_MAX = 0.05, 1.0  # a conditional τ's defaults
METHODS = ("simclr", "mocov2", "mocov3")
DISTILL_METHODS = ("seed", "kd")
# the class count of each dataset whose name tells it (synthetic: data.synthetic_classes; imagefolder: its tree)
NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "stl10": 10}


def check_classes(classes: Optional[Sequence[int]], num_classes: Optional[int], field_name: str = "data.classes") -> None:
    """``data.classes``: None, or at least 2 unique class indices in [0, num_classes) (None: count not known yet)."""
    if classes is None:
        return
    cs = [int(c) for c in classes]
    if len(cs) < 2:
        raise UserError(f"{field_name}={cs} must list at least 2 classes (contrastive pretraining and kNN need two)")
    if len(set(cs)) != len(cs):
        raise UserError(f"{field_name}={cs} lists a class more than once: each must appear once")
    bad = [c for c in cs if c < 0 or (num_classes is not None and c >= num_classes)]
    if bad:
        upper = f"{num_classes - 1}" if num_classes is not None else "the number of classes - 1"
        raise UserError(f"{field_name}={cs}: {bad} lies outside the class indices 0..{upper}")


def _choice(value: Any, key: str, accepted: tuple) -> None:
    problem = OneOf(accepted).problem(value)
    if problem is not None:
        raise ConfigError(key, f"{key}={value!r} {problem}")


def _schedule_relations(s: Any, prefix: str) -> None:
    if s.kind in ("exponential", "step", "plateau") and not s.gamma < 1:
        raise ConfigError(f"{prefix}.gamma", f"{prefix}.gamma={s.gamma} must be in (0, 1) for a decaying '{s.kind}' schedule")
    if s.kind == "cosine" and not s.end < s.start:
        raise ConfigError(f"{prefix}.end", f"{prefix}: cosine needs end (τ_min={s.end}) < start (τ_max={s.start})")


def validate_schedule(s: Any, prefix: str) -> None:
    """Check a :class:`ScheduleConfig`; raises :class:`UserError` naming ``prefix.field``."""
    check_fields(s, ScheduleConfig, f"{prefix}.")
    _schedule_relations(s, prefix)


def _temperature_relations(t: Any, prefix: str) -> None:
    if t.tau_min is not None and t.tau_max is not None and not t.tau_min < t.tau_max:
        raise ConfigError(f"{prefix}.tau_min", f"{prefix}.tau_min={t.tau_min} must be < {prefix}.tau_max={t.tau_max}")
    if t.mode == "learnable":
        if t.parametrization in ("softplus", "relu") and t.init <= t.eps:
            raise ConfigError(f"{prefix}.init", f"{prefix}.init={t.init} must be > {prefix}.eps={t.eps} for '{t.parametrization}'")
        if (t.tau_min is not None and t.init < t.tau_min) or (t.tau_max is not None and t.init > t.tau_max):
            raise ConfigError(f"{prefix}.init", f"{prefix}.init={t.init} lies outside [tau_min, tau_max]=[{t.tau_min}, {t.tau_max}]")
    if t.mode == "conditional":
        lo = t.tau_min if t.tau_min is not None else CONDITIONAL_TAU_MIN
        hi = t.tau_max if t.tau_max is not None else CONDITIONAL_TAU_MAX
        if not lo < t.init < hi:
            raise ConfigError(f"{prefix}.init", f"{prefix}.init={t.init} must lie strictly inside (tau_min, tau_max)=({lo}, {hi}) "
                              "for a conditional temperature")
    if t.mode == "scheduled":
        _schedule_relations(t.schedule, f"{prefix}.schedule")
    if t.objective == "dro" and t.mode != "conditional":
        raise ConfigError(f"{prefix}.objective", f"{prefix}.objective=dro applies to {prefix}.mode=conditional (a τ network "
                          f"trained by the robust objective); for a global or per-sample τ trained by it use {prefix}.mode=dro")
    if t.mode == "dro":
        lo = t.tau_min if t.tau_min is not None else DRO_TAU_MIN
        hi = t.tau_max if t.tau_max is not None else DRO_TAU_MAX
        if not lo <= t.init <= hi:
            raise ConfigError(f"{prefix}.init", f"{prefix}.init={t.init} lies outside [tau_min, tau_max]=[{lo}, {hi}] of the dro mode")
    elif t.objective == "dro" and (t.dro.estimator != "batch" or t.dro.per_sample):
        raise ConfigError(f"{prefix}.dro", f"{prefix}.mode=conditional with objective=dro uses the batch estimator of one τ "
                          f"network: leave {prefix}.dro.estimator=batch and {prefix}.dro.per_sample=false")


def validate_temperature(t: Any, prefix: str = "temperature") -> None:
    """Check a :class:`TemperatureConfig`; raises :class:`UserError` naming the field."""
    check_fields(t, TemperatureConfig, f"{prefix}.")
    _temperature_relations(t, prefix)


def _check_sources(data: Any) -> None:
    """``data.sources``: each a mapping of data.* keys (checked as a data section) and a finite ``score``."""
    if (data.name == "mixture") != bool(data.sources):
        raise ConfigError("data.sources", "data.name=mixture needs data.sources (a list of data.* overrides with a score "
                          "each), and data.sources needs data.name=mixture")
    for i, src in enumerate(data.sources):
        where = f"data.sources[{i}]"
        if not isinstance(src, (dict, DictConfig)):
            raise ConfigError("data.sources", f"{where}={src!r} must be a mapping of data.* keys and a score")
        src = dict(src)
        score = src.pop("score", None)
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                  or not math.isfinite(score)):
            raise ConfigError("data.sources", f"{where}.score={score!r} must be a finite number")
        try:
            node = OmegaConf.merge(OmegaConf.structured(DataConfig), src)
        except OmegaConfBaseException as e:
            raise ConfigError("data.sources", f"{where}: key '{getattr(e, 'full_key', '?')}': "
                              f"{str(e).splitlines()[0]}") from None
        try:
            check_fields(node, DataConfig, f"{where}.")
        except ConfigError as e:  # set where data.sources is
            raise ConfigError("data.sources", str(e)) from None


def _shared_relations(cfg: Any) -> None:
    """What holds between fields of the sections pretraining and distillation share."""
    _check_sources(cfg.data)
    if cfg.data.name == "mixture" and cfg.data.classes is not None:
        raise ConfigError("data.classes", "data.classes does not apply to data.name=mixture: give each source its own "
                          "(data.sources[i].classes)")
    synthetic = cfg.data.synthetic_classes if cfg.data.name == "synthetic" else None
    try:
        check_classes(cfg.data.classes, NUM_CLASSES.get(cfg.data.name, synthetic))
    except UserError as e:
        raise ConfigError("data.classes", str(e)) from None
    if cfg.data.mixture.schedule is not None:
        _schedule_relations(cfg.data.mixture.schedule, "data.mixture.schedule")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError("train.grad_accum", f"train.batch_size={cfg.train.batch_size} must be divisible by "
                          f"train.grad_accum={cfg.train.grad_accum}")
    if len(cfg.eval.knn_k) != len(cfg.eval.knn_t):
        raise ConfigError("eval.knn_t", f"eval.knn_k={list(cfg.eval.knn_k)} and eval.knn_t={list(cfg.eval.knn_t)} must "
                          "have the same length (one T per k)")


def validate(cfg: Any) -> None:
    """Check a pretraining :class:`Config`: every field, then the relations between them. Raises :class:`UserError`."""
    check_fields(cfg, Config)
    _choice(cfg.train.method, "train.method", METHODS)
    _temperature_relations(cfg.temperature, "temperature")
    robust = cfg.temperature.mode == "dro" or cfg.temperature.objective == "dro"
    if robust and cfg.train.method == "mocov3":
        raise ConfigError("train.method", "the robust (dro) τ objective needs explicit negatives: use train.method=simclr "
                          "or mocov2 (MoCo v3's in-batch loss is not supported)")
    if robust and cfg.loss.decoupled:
        raise ConfigError("loss.decoupled", "loss.decoupled applies to the contrastive loss; the robust (dro) objective is "
                          "decoupled already (its negatives exclude the positive): drop loss.decoupled=true")
    if cfg.temperature.mode == "adaptive" and cfg.train.method == "mocov3":
        raise ConfigError("temperature.mode", "temperature.mode=adaptive (MACL) is implemented for simclr and mocov2")
    _shared_relations(cfg)


def validate_distill(cfg: Any) -> None:
    """Check a :class:`DistillConfig`: every field, then the relations between them. Raises :class:`UserError`."""
    check_fields(cfg, DistillConfig)
    if cfg.train.method not in DISTILL_METHODS:
        raise ConfigError("train.method", f"train.method={cfg.train.method!r} is not valid for distillation; accepted: "
                          f"{', '.join(DISTILL_METHODS)}")
    for name in ("temperature", "teacher_temperature"):
        t = cfg[name]
        _temperature_relations(t, name)
        if t.mode in ("dro", "adaptive") or t.objective == "dro":
            raise ConfigError(f"{name}.mode", f"{name}.mode={t.mode} / objective={t.objective} is a contrastive-pretraining "
                              "τ; distillation takes fixed, learnable, scheduled or conditional")
    _shared_relations(cfg)
    if not cfg.teacher.path:
        raise ConfigError("teacher.path", "teacher.path is empty: give a run directory, an encoder.safetensors or a "
                          "checkpoint")
    d = cfg.distill
    if d.ctkd:
        t = cfg.temperature
        if cfg.train.method != "kd" or t.mode != "learnable" or t.tau_max is None:
            raise ConfigError("distill.ctkd", "distill.ctkd=true needs train.method=kd and a bounded learnable T: "
                              "temperature.mode=learnable with temperature.tau_max set (CTKD: T in [1, 21]); T ascends "
                              "the loss and is unbounded otherwise")
    if not d.grl_lambda_min <= d.grl_lambda_max:
        raise ConfigError("distill.grl_lambda_min", f"distill.grl_lambda_min={d.grl_lambda_min} and grl_lambda_max="
                          f"{d.grl_lambda_max} must satisfy 0 <= min <= max")


def check_run_environment(tc: Any) -> None:
    """What a run's ``train`` section needs of this machine, checked before it starts. Raises :class:`UserError`."""
    import torch

    from simclr_tau.fileio import check_writable_dir

    if tc.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision='fp16' needs a CUDA GPU (fp16 autocast with a loss scaler); without "
                        "one use bf16 or no")
    check_writable_dir(tc.output_dir, "train.output_dir")
