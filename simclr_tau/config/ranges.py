"""The accepted values of every knob, field by field: one table beside the dataclasses of
:mod:`~simclr_tau.config.schema` (:data:`RULES`, a rule per field of every section), and :func:`check_fields`,
which walks a config (a DictConfig or the dataclasses themselves) through it.

A rule is a :class:`Range` (numbers; bounds open or closed), a :class:`OneOf` (a choice), :class:`Each` (the
elements of a list), :data:`RUN_NAME` (one directory name) or :class:`Free`: any value of the field's type is
accepted, on purpose, for the reason it gives (a switch, a free name, or a value checked where it is used). On
top of the table: a float must be finite everywhere (``nan``, ``inf`` are refused), and a ``null`` is accepted
exactly where the type is Optional (the default says what it means). Checks between fields (``tau_min <
tau_max``, a batch divisible by the accumulation steps) are :mod:`~simclr_tau.config.validate`'s.

:data:`KNN_ARGS` and :data:`LINEAR_ARGS` are the same for the options of ``simclr-tau knn`` / ``linear``
(:func:`check_args`).

A refusal is a :class:`ConfigError` (a :class:`UserError`) naming the key, so that
:func:`~simclr_tau.config.load.load_config` can say which file or override set it::

    optim.grad_clip=-1.0 must be > 0 or null
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from simclr_tau.config.schema import (AdaptiveConfig, AugmentConfig, Config, DataConfig, DistillConfig,
                                      DistillObjectiveConfig, DROConfig, EvalConfig, LossConfig, MixtureConfig,
                                      MocoConfig, ModelConfig, OptimConfig, ScheduleConfig, TeacherConfig,
                                      TemperatureConfig, TrainConfig, WandbConfig)
from simclr_tau.errors import UserError


class ConfigError(UserError):
    """A refused config value; ``key`` is its dotted name (``optim.grad_clip``, ``eval.knn_k``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Range:
    """A number within bounds: ``gt`` / ``ge`` below, ``lt`` / ``le`` above (None: unbounded)."""

    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None

    def problem(self, value: Any) -> Optional[str]:
        lo, hi = (self.gt if self.gt is not None else self.ge), (self.lt if self.lt is not None else self.le)
        if (self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge) and \
                (self.lt is None or value < self.lt) and (self.le is None or value <= self.le):
            return None
        if lo is not None and hi is not None:
            return f"must lie in {'(' if self.gt is not None else '['}{_num(lo)}, {_num(hi)}{')' if self.lt is not None else ']'}"
        if lo is not None:
            return f"must be {'>' if self.gt is not None else '>='} {_num(lo)}"
        return f"must be {'<' if self.lt is not None else '<='} {_num(hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class OneOf:
    values: Tuple[str, ...]

    def problem(self, value: Any) -> Optional[str]:
        return None if value in self.values else f"is not valid; accepted: {', '.join(self.values)}"


@dataclass(frozen=True)
class Each:
    """Every element of a list passes ``rule``; the list has ``length`` elements (or at least ``min_len``)."""

    rule: Any
    min_len: int = 0
    length: Optional[int] = None

    def problem(self, value: Any) -> Optional[str]:
        n = len(value)
        if self.length is not None and n != self.length:
            return f"must have {self.length} elements"
        if n < self.min_len:
            return f"must have at least {self.min_len} element{'s' if self.min_len > 1 else ''}"
        for i, v in enumerate(value):
            problem = _finite(v) or self.rule.problem(v)
            if problem is not None:
                return f"element {i} ({v!r}) {problem}"
        return None


@dataclass(frozen=True)
class _RunName:
    def problem(self, value: Any) -> Optional[str]:
        if value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value:
            return "must be one directory name inside train.output_dir (no '/', not '.' or '..')"
        return None


RUN_NAME = _RunName()


@dataclass(frozen=True)
class Free:
    """Any value of the field's type, on purpose: ``why``."""

    why: str

    def problem(self, value: Any) -> Optional[str]:
        return None


Rule = Union[Range, OneOf, Each, _RunName, Free]

SWITCH = Free("a switch: true or false (the type is checked on load)")
POSITIVE, AT_LEAST_1, NON_NEGATIVE = Range(gt=0), Range(ge=1), Range(ge=0)
PROBABILITY, FRACTION = Range(ge=0, le=1), Range(gt=0, le=1)  # FRACTION: a weight that must do something
WIDTH = Range(ge=1, le=65536)  # a layer width: past 65536 a typo's memory would be the error
SEED = Range(ge=0, le=2**32 - 1)  # numpy's seed range (accelerate seeds numpy too)

SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential", "step", "plateau")
OUT_BN_CHOICES = ("auto", "none", "plain", "affine")  # model.proj_out_bn
TEMPERATURE_MODES = ("fixed", "learnable", "conditional", "scheduled", "dro", "adaptive")
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic", "mixture")

RULES: Dict[type, Dict[str, Rule]] = {
    ScheduleConfig: {
        "kind": OneOf(SCHEDULE_KINDS), "start": POSITIVE, "end": POSITIVE, "period_epochs": POSITIVE,
        "gamma": POSITIVE, "every_epochs": POSITIVE, "warmup_epochs": NON_NEGATIVE, "warmup_start": POSITIVE,
        "patience": AT_LEAST_1, "monitor_mode": OneOf(("max", "min")),
    },
    MixtureConfig: {
        "weighting": OneOf(("scores", "size")), "temperature": POSITIVE, "schedule": Free("a ScheduleConfig"),
        "num_samples": AT_LEAST_1,
    },
    DROConfig: {
        "per_sample": SWITCH, "rho": POSITIVE, "eta": POSITIVE, "beta": FRACTION,
        "estimator": OneOf(("batch", "sogclr")), "gamma": FRACTION, "gamma_schedule": OneOf(("constant", "cosine")),
        "gamma_decay_epochs": POSITIVE,
    },
    AdaptiveConfig: {"alpha": NON_NEGATIVE, "a0": Range(ge=-1, le=1)},  # a0: a reference mean cosine
    TemperatureConfig: {
        "mode": OneOf(TEMPERATURE_MODES), "init": POSITIVE, "objective": OneOf(("contrastive", "dro")),
        "parametrization": OneOf(("log", "softplus", "relu")), "eps": POSITIVE, "tau_min": POSITIVE,
        "tau_max": POSITIVE, "lr_scale": POSITIVE, "hidden_dim": WIDTH, "depth": Range(ge=1, le=64),
        "detach_input": SWITCH, "schedule": Free("a section"), "dro": Free("a section"),
        "adaptive": Free("a section"),
    },
    LossConfig: {"decoupled": SWITCH},
    DataConfig: {
        "name": OneOf(DATASETS),
        "root": Free("a directory, read by the dataset: a missing one is an error naming it then"),
        "download": SWITCH,
        "val_root": Free("a directory, read by the dataset (imagefolder): a missing one is an error naming it then"),
        "channels": OneOf(("native", "rgb")), "image_size": Range(ge=8, le=4096), "subset": AT_LEAST_1,
        "pipeline": OneOf(("auto", "batched", "dataloader")),
        "num_workers": Range(ge=0, le=256),  # more is a fork bomb, not a speed-up
        "folder_cache_mb": Range(ge=0, le=2**24),  # 0: no cache; 16 TiB would be a typo, not a cache
        "cache_dir": Free("a directory, created when the imagefolder cache is first written (a failed write is one line, then no cache)"),
        "classes": Free("class indices, checked against the dataset's class count (validate.check_classes)"),
        "synthetic_size": Range(ge=1, le=10_000_000), "synthetic_classes": Range(ge=1, le=100_000),
        "synthetic_image_size": Range(ge=8, le=4096), "synthetic_noise": NON_NEGATIVE,
        "sources": Free("data.* overrides and a score per source: each checked as a data section (validate)"),
        "mixture": Free("a section"),
    },
    AugmentConfig: {
        "crop_scale_min": FRACTION, "flip_p": PROBABILITY, "jitter_p": PROBABILITY,
        "jitter_strength": Range(ge=0, le=5),  # the hue shift 0.1 s within torchvision's 0.5
        "grayscale_p": PROBABILITY, "blur_p": PROBABILITY, "solarize_p": PROBABILITY, "enabled": SWITCH,
    },
    ModelConfig: {
        "backbone": Free("any timm name: checked when the model is built (models.encoder.check_model_name)"),
        "backbone_kwargs": Free("architecture arguments: checked when the model is built (check_backbone_kwargs)"),
        "small_stem": SWITCH, "stem_pool": SWITCH, "proj_hidden_dim": WIDTH, "proj_dim": WIDTH,
        "proj_layers": Range(ge=1, le=16), "proj_bn": SWITCH, "sync_bn": SWITCH,
        "proj_out_bn": OneOf(OUT_BN_CHOICES),
    },
    OptimConfig: {
        "name": OneOf(("sgd", "adamw", "lars")),
        "lr": POSITIVE,  # a diverging lr is stopped by the non-finite guard, with advice
        "lr_scaling": OneOf(("linear", "sqrt", "none")), "weight_decay": NON_NEGATIVE, "momentum": Range(ge=0, lt=1),
        "betas": Each(Range(ge=0, lt=1), length=2), "warmup_epochs": NON_NEGATIVE, "final_lr_ratio": PROBABILITY,
        "grad_clip": POSITIVE, "fused": SWITCH,
    },
    MocoConfig: {
        "momentum": PROBABILITY, "momentum_cosine": SWITCH, "queue_size": Range(ge=1, le=10_000_000),
        "symmetric": SWITCH, "shuffle_bn": SWITCH, "pred_hidden_dim": WIDTH,
    },
    TrainConfig: {
        "method": Free("checked against the entry point's methods (validate / validate_distill)"),
        "epochs": AT_LEAST_1, "max_steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1,
        "mixed_precision": OneOf(("no", "bf16", "fp16")),
        "seed": SEED,
        "log_every": AT_LEAST_1, "save_every_epochs": AT_LEAST_1, "save_every_steps": AT_LEAST_1,
        "keep_last": AT_LEAST_1,
        "output_dir": Free("a directory, created if missing: a file or one not writable is refused when a run "
                           "starts (validate.check_run_environment)"),
        "run_name": RUN_NAME, "deterministic": SWITCH, "progress": SWITCH, "channels_last": SWITCH,
        "compile": SWITCH,
    },
    EvalConfig: {
        "knn_k": Each(AT_LEAST_1, min_len=1), "knn_t": Each(POSITIVE, min_len=1), "online_knn_every": NON_NEGATIVE,
        "online_knn_subset": AT_LEAST_1, "batch_size": AT_LEAST_1,
    },
    WandbConfig: {
        "enabled": SWITCH, "project": Free("a W&B name: W&B refuses a bad one and the run goes on offline"),
        "entity": Free("a W&B name, as project"), "mode": OneOf(("auto", "online", "offline", "disabled")),
        "group": Free("a W&B name, as project"), "tags": Free("W&B labels: any strings"),
    },
    TeacherConfig: {
        "path": Free("a run directory, encoder or checkpoint: an empty one is refused (validate_distill), a "
                     "missing or unreadable one when the teacher is loaded"),
        "model": Free("ModelConfig fields, merged into a model section when a checkpoint teacher is loaded"),
        "probe": Free("a teacher_probe.safetensors file, read when the teacher is loaded"),
        "probe_iters": Range(ge=1, le=100_000),
    },
    DistillObjectiveConfig: {
        "queue_size": Range(ge=1, le=10_000_000), "alpha": PROBABILITY, "ctkd": SWITCH, "grl_lambda_min": NON_NEGATIVE,
        "grl_lambda_max": NON_NEGATIVE, "grl_ramp_epochs": POSITIVE,
    },
    Config: {name: Free("a section") for name in Config.__dataclass_fields__},
    DistillConfig: {name: Free("a section") for name in DistillConfig.__dataclass_fields__},
}


# ---- the evaluation commands' options (argparse dests; None: not given, the config's value applies) -----------
_FEATURE_ARGS: Dict[str, Rule] = {"seed": SEED, "batch_size": AT_LEAST_1, "num_workers": Range(ge=0, le=256)}
KNN_ARGS: Dict[str, Rule] = {
    **_FEATURE_ARGS, "k": Each(AT_LEAST_1, min_len=1), "t": Each(POSITIVE, min_len=1), "nlist": AT_LEAST_1,
    "nprobe": AT_LEAST_1, "diag_n": AT_LEAST_1,
}
LINEAR_ARGS: Dict[str, Rule] = {
    **_FEATURE_ARGS, "epochs": AT_LEAST_1, "lr": Each(POSITIVE, min_len=1), "wd": Each(NON_NEGATIVE, min_len=1),
    "probe_batch_size": NON_NEGATIVE,  # 0: full batch
    "val_fraction": Range(gt=0, lt=1),  # > 0: hyperparameters and the calibration temperature are fitted on it
    "crop_scale_min": FRACTION,
}


def check_args(args: Any, rules: Dict[str, Rule]) -> None:
    """Check command-line options (an argparse namespace) against ``rules``; an option not given (None) passes.
    Raises :class:`UserError` naming the option (``--batch-size=-4 must be >= 1``)."""
    for dest, rule in rules.items():
        value = getattr(args, dest)
        problem = None if value is None else _finite(value) or rule.problem(value)
        if problem is not None:
            raise UserError(f"--{dest.replace('_', '-')}={value!r} {problem}")


def _finite(value: Any) -> Optional[str]:
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    return None


@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> Tuple[Tuple[str, Optional[type], bool], ...]:
    """(name, the dataclass it holds or None, Optional?) for each field of ``cls``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        args = typing.get_args(hints[f.name])
        optional = typing.get_origin(hints[f.name]) is Union and type(None) in args
        inner = next(a for a in args if a is not type(None)) if optional else hints[f.name]
        out.append((f.name, inner if dataclasses.is_dataclass(inner) else None, optional))
    return tuple(out)


def check_fields(node: Any, cls: type, prefix: str = "") -> None:
    """Check every field of ``node`` (a ``cls`` section: DictConfig or dataclass) against :data:`RULES`, the
    nested sections too. Raises :class:`ConfigError` naming ``prefix + field``."""
    for name, section, optional in _fields(cls):
        value, key = getattr(node, name), f"{prefix}{name}"
        if value is None and optional:
            continue
        if section is not None:
            check_fields(value, section, f"{key}.")
            continue
        problem = _finite(value) or RULES[cls][name].problem(value)
        if problem is not None:
            raise ConfigError(key, f"{key}={value!r} {problem}{' or null' if optional else ''}")
