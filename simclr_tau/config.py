"""Typed configuration: the dataclasses below document every knob and its default.

A run's config is built as ``defaults <- YAML file <- command-line overrides (a.b=value)`` with
OmegaConf structured configs (the library Hydra uses): an unknown key or a value of the wrong type is
rejected with the key's full name and the file it came from. :func:`validate` then checks value ranges
and choices that a type cannot express, again naming the field and the accepted values.

Data flow: ``load_config(path, overrides)`` -> :class:`Config` -> ``pretrain.run(cfg)`` writes
``<train.output_dir>/<run name>/config.yaml`` (the resolved config) next to metrics and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from simclr_tau.errors import UserError


@dataclass
class ScheduleConfig:
    """A per-step schedule for any temperature (contrastive τ, distillation T, sampling T).

    Epoch-valued fields may be fractional; the schedule is evaluated at every optimizer step.
    """

    kind: str = "constant"  # constant | linear | cosine | exponential | step | plateau
    start: float = 0.1  # value at step 0 (cosine: τ_max, the value at phase 0)
    end: float = 0.1  # linear: final value; cosine: τ_min; exponential/step/plateau: floor
    period_epochs: Optional[float] = None  # cosine period P in epochs; None = 2 x epochs (one decay start -> end)
    gamma: float = 0.5  # exponential: factor per epoch; step/plateau: factor per drop
    every_epochs: float = 1.0  # step: drop every k epochs
    warmup_epochs: float = 0.0  # linear warm-up from warmup_start to the schedule
    warmup_start: Optional[float] = None  # None = start
    patience: int = 2  # plateau: evaluations without improvement before a drop
    monitor_mode: str = "max"  # plateau: "max" (accuracy) or "min" (loss)


@dataclass
class MixtureConfig:
    """How the sources of ``data.sources`` are mixed (formulas: :mod:`simclr_tau.data.mixture`)."""

    weighting: str = "scores"  # scores: P(i|T) = softmax(w/T)_i, w = each source's `score` | size: p_i ∝ n_i^(1/T)
    temperature: float = 1.0  # T, constant
    schedule: Optional[ScheduleConfig] = None  # T per optimizer step instead (e.g. linear 10 -> 1: broad -> focused)
    num_samples: Optional[int] = None  # draws per epoch; None = the total number of images of all sources


@dataclass
class TemperatureConfig:
    """How τ behaves. See :mod:`simclr_tau.temperature` for the formulas."""

    mode: str = "fixed"  # fixed | learnable | conditional | scheduled
    init: float = 0.1  # fixed value, or initial value of a learnable τ
    parametrization: str = "log"  # learnable: log (τ = exp θ) | softplus (τ = softplus θ + eps) | relu (τ = relu θ + eps)
    eps: float = 1e-3  # floor of the softplus / relu parametrizations
    tau_min: Optional[float] = None  # learnable: optional lower bound; conditional: default 0.05
    tau_max: Optional[float] = None  # learnable: optional upper bound; conditional: default 1.0
    lr_scale: float = 1.0  # the τ parameters' learning rate = lr_scale x the encoder's; never weight-decayed
    hidden_dim: int = 128  # conditional: MLP width
    depth: int = 2  # conditional: number of linear layers
    detach_input: bool = True  # conditional: read the projection output without backpropagating into the encoder
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # scheduled mode


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | stl10 | imagefolder | synthetic | mixture
    root: str = "data"  # dataset directory (fashion_mnist: directory holding the idx .gz files)
    download: bool = False  # let torchvision download fashion_mnist / cifar / stl10 when online
    val_root: Optional[str] = None  # imagefolder: held-out split for evaluation (default: root)
    channels: str = "native"  # native: in_chans as stored (1 for grayscale) | rgb: repeat grayscale to 3
    image_size: Optional[int] = None  # None = the dataset's native size
    subset: Optional[int] = None  # use only the first n training images (debugging, tests)
    pipeline: str = "auto"  # auto | batched (uint8 dataset on the device, augmented in batches) | dataloader (per-sample torchvision in workers); auto = batched for in-memory datasets
    num_workers: int = 2  # DataLoader worker processes per training process (dataloader pipeline)
    synthetic_size: int = 256  # synthetic: number of images
    synthetic_classes: int = 4  # synthetic: number of classes
    synthetic_image_size: int = 16  # synthetic: side in pixels
    synthetic_noise: float = 0.15  # synthetic: std of the per-pixel Gaussian noise (class patterns lie in [0, 1])
    sources: List[Dict[str, Any]] = field(default_factory=list)  # name=mixture: data.* overrides + `score` per source
    mixture: MixtureConfig = field(default_factory=MixtureConfig)  # name=mixture: temperature sampling over sources


@dataclass
class AugmentConfig:
    """The SimCLR recipe (Chen et al. 2020, Appendix A). None = image-size-aware default."""

    crop_scale_min: Optional[float] = None  # random resized crop scale (min, 1.0); default 0.08 (>=96 px) / 0.2 (small)
    flip_p: float = 0.5
    jitter_strength: float = 1.0  # s: brightness/contrast/saturation 0.4 s, hue 0.1 s; s=1 is SimCLR's CIFAR 0.4/0.4/0.4/0.1 (the paper's 0.8 s'/0.2 s' with s'=0.5)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: Optional[float] = None  # default 0.5 at >= 96 px, 0 below (blur destroys 28-32 px images)
    solarize_p: float = 0.0
    enabled: bool = True  # False: identity views (tests, determinism checks)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model kwargs (e.g. img_size, patch_size for ViT)
    small_stem: bool = True  # ResNet-like at 28-32 px: 3x3 stride-1 stem conv, no max-pool
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    proj_layers: int = 2  # linear layers in the projection MLP (BN + ReLU between)
    proj_bn: bool = True  # BatchNorm in the projection MLP (False: a BN-free model, e.g. for exact multi-process checks on CPU)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw | lars
    lr: float = 0.3  # base learning rate for a global batch of 256 (see lr_scaling)
    lr_scaling: str = "linear"  # linear: lr x B/256 (SimCLR) | sqrt: lr x sqrt(B/256) | none
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to final_lr_ratio x lr
    final_lr_ratio: float = 0.0
    grad_clip: Optional[float] = None  # max global gradient norm
    fused: bool = True  # torch's fused (single-kernel) SGD / AdamW update where the device supports it


@dataclass
class MocoConfig:
    momentum: float = 0.99  # EMA coefficient m of the key encoder
    momentum_cosine: bool = True  # ramp m toward 1 with a cosine (BYOL / MoCo v3)
    queue_size: int = 4096  # v2: number of negative keys K
    symmetric: bool = False  # v2: symmetric loss (v3 is always symmetric)
    shuffle_bn: bool = True  # v2: shuffle the key batch across processes (no effect with one process)
    pred_hidden_dim: int = 512  # v3 predictor MLP


@dataclass
class TrainConfig:
    method: str = "simclr"  # simclr | mocov2 | mocov3
    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many optimizer steps (smoke tests)
    batch_size: int = 256  # global batch (all processes, all accumulation steps)
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 0
    log_every: int = 10  # steps between metric logs (tau / loss are read from the device only then)
    save_every_epochs: int = 1
    save_every_steps: Optional[int] = None  # also checkpoint every n optimizer steps (bounds the work lost to a kill)
    keep_last: int = 2  # checkpoints kept
    output_dir: str = "runs"
    run_name: Optional[str] = None  # default: <method>-<tau mode>-<dataset>-<backbone>-<time>
    deterministic: bool = False  # torch.use_deterministic_algorithms (tests, exact resume)
    progress: bool = True  # tqdm progress bar
    channels_last: bool = True  # NHWC activations: faster convolutions on CPU (oneDNN) and GPU (tensor cores)
    compile: bool = False  # torch.compile the encoder (first steps slower while it compiles)


@dataclass
class EvalConfig:
    knn_k: List[int] = field(default_factory=lambda: [20, 200])
    knn_t: List[float] = field(default_factory=lambda: [0.07, 0.1])  # paired with knn_k
    online_knn_every: int = 0  # epochs between online kNN evaluations (0 = off)
    online_knn_subset: Optional[int] = 10000  # train images used by the online kNN
    batch_size: int = 512


@dataclass
class WandbConfig:
    enabled: bool = True
    project: Optional[str] = None  # default: $WANDB_PROJECT or "simclr-tau"
    entity: Optional[str] = None  # default: $WANDB_ENTITY
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def _omegaconf_error(e: OmegaConfBaseException, source: str) -> UserError:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return UserError(f"config {source}: key '{key}': {msg}")


def merge_into(schema: Any, source: str, data: Any) -> Any:
    """Merge ``data`` (dict/DictConfig) into the structured ``schema``; errors name the key and source."""
    try:
        return OmegaConf.merge(schema, data)
    except OmegaConfBaseException as e:
        raise _omegaconf_error(e, source) from None


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), schema: type = Config) -> Any:
    """Build a validated config from defaults, an optional YAML file and ``a.b=value`` overrides.

    Returns an OmegaConf DictConfig typed by ``schema`` (attribute access, e.g. ``cfg.train.epochs``).
    Raises :class:`UserError` for a missing file, invalid YAML, an unknown key or a wrong type.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            file_cfg = OmegaConf.load(p)  # yaml.SafeLoader underneath: no arbitrary objects
        except Exception as e:  # yaml.YAMLError and friends
            raise UserError(f"config {p}: invalid YAML: {str(e).splitlines()[0]}") from None
        cfg = merge_into(cfg, str(p), file_cfg)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. train.epochs=5)")
        try:
            dot = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as e:
            raise _omegaconf_error(e, f"override '{item}'") from None
        cfg = merge_into(cfg, f"override '{item}'", dot)
    if schema is Config:
        validate(cfg)
    return cfg


def _choice(value: Any, field_name: str, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise UserError(f"{field_name}={value!r} is not valid; accepted: {', '.join(accepted)}")


def _positive(value: Optional[float], field_name: str) -> None:
    if value is not None and not value > 0:
        raise UserError(f"{field_name}={value!r} must be > 0")


TEMPERATURE_MODES = ("fixed", "learnable", "conditional", "scheduled")
PARAMETRIZATIONS = ("log", "softplus", "relu")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "exponential", "step", "plateau")
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic", "mixture")
METHODS = ("simclr", "mocov2", "mocov3")


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
        lo = t.tau_min if t.tau_min is not None else 0.05  # ConditionalTemperature's default bounds
        hi = t.tau_max if t.tau_max is not None else 1.0
        if not lo < t.init < hi:
            raise UserError(f"{prefix}.init={t.init} must lie strictly inside (tau_min, tau_max)=({lo}, {hi}) for a conditional temperature")
    if t.mode == "scheduled":
        validate_schedule(t.schedule, f"{prefix}.schedule")


def validate(cfg: Any) -> None:
    """Range and choice checks a type cannot express. Raises :class:`UserError`."""
    validate_temperature(cfg.temperature)
    _choice(cfg.data.name, "data.name", DATASETS)
    _choice(cfg.data.channels, "data.channels", ("native", "rgb"))
    _choice(cfg.data.pipeline, "data.pipeline", ("auto", "batched", "dataloader"))
    if (cfg.data.name == "mixture") != bool(cfg.data.sources):
        raise UserError("data.name=mixture needs data.sources (a list of data.* overrides with a score each), "
                        "and data.sources needs data.name=mixture")
    _choice(cfg.train.method, "train.method", METHODS)
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


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg)


def flatten(cfg: Any) -> dict:
    """Flatten a config to ``{"a.b": value}`` (for W&B and for comparing runs)."""
    out: dict = {}

    def rec(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                rec(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    rec(OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg, "")
    return out
