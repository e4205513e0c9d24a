"""Range and choice checks of a loaded config that its types cannot express (:class:`UserError` naming
``section.key``, the value and what is accepted)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from simclr_tau.config.schema import Config
from simclr_tau.errors import UserError


def _choice(value: Any, field_name: str, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise UserError(f"{field_name}={value!r} is not valid; accepted: {', '.join(accepted)}")


def _positive(value: Optional[float], field_name: str) -> None:
    if value is not None and not value > 0:
        raise UserError(f"{field_name}={value!r} must be > 0")


TEMPERATURE_MODES = ("fixed", "learnable", "conditional", "scheduled", "dro", "adaptive")
OBJECTIVES = ("contrastive", "dro")
DRO_TAU_MIN, DRO_TAU_MAX = 0.05, 0.7  # iSogCLR's image bounds: the dro mode's defaults
CONDITIONAL_TAU_MIN, CONDITIONAL_TAU_MAX = 0.05, 1.0  # a conditional τ's defaults
PARAMETRIZATIONS = ("log", "softplus", "relu")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential", "step", "plateau")
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic", "mixture")
METHODS = ("simclr", "mocov2", "mocov3")
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
        raise UserError(f"{field_name}={cs} lists a class more than once")
    bad = [c for c in cs if c < 0 or (num_classes is not None and c >= num_classes)]
    if bad:
        upper = f"{num_classes - 1}" if num_classes is not None else "the number of classes - 1"
        raise UserError(f"{field_name}={cs}: {bad} outside the class indices 0..{upper}")


def validate_schedule(s: Any, prefix: str) -> None:
    """Check a :class:`ScheduleConfig`; raises :class:`UserError` naming ``prefix.field``."""
    _choice(s.kind, f"{prefix}.kind", SCHEDULE_KINDS)
    for name in ("start", "end", "gamma", "every_epochs"):
        _positive(getattr(s, name), f"{prefix}.{name}")
    _positive(s.period_epochs, f"{prefix}.period_epochs")
    _positive(s.warmup_start, f"{prefix}.warmup_start")
    if s.warmup_epochs < 0:
        raise UserError(f"{prefix}.warmup_epochs={s.warmup_epochs} must be >= 0")
    if s.kind in ("exponential", "step", "plateau") and not s.gamma < 1:
        raise UserError(f"{prefix}.gamma={s.gamma} must be in (0, 1) for a decaying '{s.kind}' schedule")
    if s.kind == "cosine" and not s.end < s.start:
        raise UserError(f"{prefix}: cosine needs end (τ_min={s.end}) < start (τ_max={s.start})")
    _choice(s.monitor_mode, f"{prefix}.monitor_mode", ("max", "min"))


def validate_temperature(t: Any, prefix: str = "temperature") -> None:
    """Check a :class:`TemperatureConfig`; raises :class:`UserError` naming the field."""
    _choice(t.mode, f"{prefix}.mode", TEMPERATURE_MODES)
    _choice(t.parametrization, f"{prefix}.parametrization", PARAMETRIZATIONS)
    _positive(t.init, f"{prefix}.init")
    _positive(t.eps, f"{prefix}.eps")
    _positive(t.tau_min, f"{prefix}.tau_min")
    _positive(t.tau_max, f"{prefix}.tau_max")
    _positive(t.lr_scale, f"{prefix}.lr_scale")
    if t.tau_min is not None and t.tau_max is not None and not t.tau_min < t.tau_max:
        raise UserError(f"{prefix}.tau_min={t.tau_min} must be < {prefix}.tau_max={t.tau_max}")
    if t.mode == "learnable":
        if t.parametrization in ("softplus", "relu") and t.init <= t.eps:
            raise UserError(f"{prefix}.init={t.init} must be > {prefix}.eps={t.eps} for '{t.parametrization}'")
        if (t.tau_min is not None and t.init < t.tau_min) or (t.tau_max is not None and t.init > t.tau_max):
            raise UserError(f"{prefix}.init={t.init} lies outside [tau_min, tau_max]=[{t.tau_min}, {t.tau_max}]")
    if t.mode == "conditional":
        if t.hidden_dim < 1 or t.depth < 1:
            raise UserError(f"{prefix}.hidden_dim and {prefix}.depth must be >= 1")
        lo = t.tau_min if t.tau_min is not None else CONDITIONAL_TAU_MIN
        hi = t.tau_max if t.tau_max is not None else CONDITIONAL_TAU_MAX
        if not lo < t.init < hi:
            raise UserError(f"{prefix}.init={t.init} must lie strictly inside (tau_min, tau_max)=({lo}, {hi}) for a conditional temperature")
    if t.mode == "scheduled":
        validate_schedule(t.schedule, f"{prefix}.schedule")
    _choice(t.objective, f"{prefix}.objective", OBJECTIVES)
    if t.objective == "dro" and t.mode != "conditional":
        raise UserError(f"{prefix}.objective=dro applies to {prefix}.mode=conditional (a τ network trained by the robust "
                        f"objective); for a global or per-sample τ trained by it use {prefix}.mode=dro")
    if t.mode == "dro" or t.objective == "dro":
        validate_dro(t, prefix)
    if t.mode == "adaptive" and not t.adaptive.alpha >= 0:
        raise UserError(f"{prefix}.adaptive.alpha={t.adaptive.alpha} must be >= 0")


def validate_dro(t: Any, prefix: str = "temperature") -> None:
    """Checks of ``temperature.dro``; the robust objective's τ-bounds default to iSogCLR's [0.05, 0.7]."""
    d, p = t.dro, f"{prefix}.dro"
    _positive(d.rho, f"{p}.rho")
    _positive(d.eta, f"{p}.eta")
    if not 0 < d.beta <= 1:
        raise UserError(f"{p}.beta={d.beta} must lie in (0, 1]")
    _choice(d.estimator, f"{p}.estimator", ("batch", "sogclr"))
    if not 0 < d.gamma <= 1:
        raise UserError(f"{p}.gamma={d.gamma} must lie in (0, 1]")
    _choice(d.gamma_schedule, f"{p}.gamma_schedule", ("constant", "cosine"))
    _positive(d.gamma_decay_epochs, f"{p}.gamma_decay_epochs")
    if t.mode == "dro":
        lo = t.tau_min if t.tau_min is not None else DRO_TAU_MIN
        hi = t.tau_max if t.tau_max is not None else DRO_TAU_MAX
        if not lo <= t.init <= hi:
            raise UserError(f"{prefix}.init={t.init} lies outside [tau_min, tau_max]=[{lo}, {hi}] of the dro mode")
    elif d.estimator != "batch" or d.per_sample:
        raise UserError(f"{prefix}.mode=conditional with objective=dro uses the batch estimator of one τ network: "
                        f"leave {p}.estimator=batch and {p}.per_sample=false")


def validate(cfg: Any) -> None:
    """Range and choice checks a type cannot express. Raises :class:`UserError`."""
    validate_temperature(cfg.temperature)
    _choice(cfg.data.name, "data.name", DATASETS)
    _choice(cfg.data.channels, "data.channels", ("native", "rgb"))
    _choice(cfg.data.pipeline, "data.pipeline", ("auto", "batched", "dataloader"))
    if (cfg.data.name == "mixture") != bool(cfg.data.sources):
        raise UserError("data.name=mixture needs data.sources (a list of data.* overrides with a score each), "
                        "and data.sources needs data.name=mixture")
    if cfg.data.name == "mixture" and cfg.data.classes is not None:
        raise UserError("data.classes does not apply to data.name=mixture: give each source its own "
                        "(data.sources[i].classes)")
    synthetic = cfg.data.synthetic_classes if cfg.data.name == "synthetic" else None
    check_classes(cfg.data.classes, NUM_CLASSES.get(cfg.data.name, synthetic))
    _choice(cfg.train.method, "train.method", METHODS)
    robust = cfg.temperature.mode == "dro" or cfg.temperature.objective == "dro"
    if robust and cfg.train.method == "mocov3":
        raise UserError("the robust (dro) τ objective needs explicit negatives: use train.method=simclr or mocov2 "
                        "(MoCo v3's in-batch loss is not supported)")
    if robust and cfg.loss.decoupled:
        raise UserError("loss.decoupled applies to the contrastive loss; the robust (dro) objective is decoupled "
                        "already (its negatives exclude the positive): drop loss.decoupled=true")
    if cfg.temperature.mode == "adaptive" and cfg.train.method == "mocov3":
        raise UserError("temperature.mode=adaptive (MACL) is implemented for simclr and mocov2")
    _choice(cfg.train.mixed_precision, "train.mixed_precision", ("no", "bf16", "fp16"))
    _choice(cfg.optim.name, "optim.name", ("sgd", "adamw", "lars"))
    _choice(cfg.optim.lr_scaling, "optim.lr_scaling", ("linear", "sqrt", "none"))
    _choice(cfg.wandb.mode, "wandb.mode", ("auto", "online", "offline", "disabled"))
    for name in ("epochs", "batch_size", "grad_accum", "log_every", "save_every_epochs", "keep_last"):
        if getattr(cfg.train, name) < 1:
            raise UserError(f"train.{name}={getattr(cfg.train, name)} must be >= 1")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise UserError(f"train.batch_size={cfg.train.batch_size} must be divisible by train.grad_accum={cfg.train.grad_accum}")
    _positive(cfg.optim.lr, "optim.lr")
    if cfg.moco.queue_size <= 0:
        raise UserError(f"moco.queue_size={cfg.moco.queue_size} must be > 0")
    if not 0.0 <= cfg.moco.momentum <= 1.0:
        raise UserError(f"moco.momentum={cfg.moco.momentum} must lie in [0, 1]")
    if len(cfg.eval.knn_k) != len(cfg.eval.knn_t):
        raise UserError("eval.knn_k and eval.knn_t must have the same length (one T per k)")


DISTILL_METHODS = ("seed", "kd")
_SHARED = ("data", "augment", "model", "temperature", "optim", "train", "eval", "wandb")


def validate_distill(cfg: Any) -> None:
    """Range checks of a DistillConfig (the shared sections with pretraining's own checks). UserError."""
    if cfg.train.method not in DISTILL_METHODS:
        raise UserError(f"train.method={cfg.train.method!r} is not valid for distillation; accepted: {', '.join(DISTILL_METHODS)}")
    view = OmegaConf.merge(OmegaConf.structured(Config), {k: cfg[k] for k in _SHARED})
    view.train.method = "simclr"  # pretraining's check of the method name does not apply here
    validate(view)
    validate_temperature(cfg.teacher_temperature, "teacher_temperature")
    for name in ("temperature", "teacher_temperature"):
        t = cfg[name]
        if t.mode in ("dro", "adaptive") or t.objective == "dro":
            raise UserError(f"{name}.mode={t.mode} / objective={t.objective} is a contrastive-pretraining τ; "
                            f"distillation takes fixed, learnable, scheduled or conditional")
    if not cfg.teacher.path:
        raise UserError("teacher.path is empty: give a run directory, an encoder.safetensors or a checkpoint")
    d = cfg.distill
    if d.queue_size < 1:
        raise UserError(f"distill.queue_size={d.queue_size} must be >= 1")
    if not 0.0 <= d.alpha <= 1.0:
        raise UserError(f"distill.alpha={d.alpha} must lie in [0, 1]")
    if d.ctkd:
        t = cfg.temperature
        if cfg.train.method != "kd" or t.mode != "learnable" or t.tau_max is None:
            raise UserError("distill.ctkd=true needs train.method=kd and a bounded learnable T: temperature.mode=learnable "
                            "with temperature.tau_max set (CTKD: T in [1, 21]); T ascends the loss and is unbounded otherwise")
        if not 0.0 <= d.grl_lambda_min <= d.grl_lambda_max:
            raise UserError(f"distill.grl_lambda_min={d.grl_lambda_min} and grl_lambda_max={d.grl_lambda_max} "
                            "must satisfy 0 <= min <= max")
        if d.grl_ramp_epochs is not None and not d.grl_ramp_epochs > 0:
            raise UserError(f"distill.grl_ramp_epochs={d.grl_ramp_epochs} must be > 0")
    if cfg.teacher.probe_iters < 1:
        raise UserError(f"teacher.probe_iters={cfg.teacher.probe_iters} must be >= 1")
