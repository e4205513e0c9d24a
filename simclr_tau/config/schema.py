"""The config schema: dataclasses whose fields and comments document every knob and its default.

:class:`Config` is pretraining's (``simclr-tau pretrain``), :class:`DistillConfig` distillation's
(``simclr-tau distill``); both share the section dataclasses. Checks a type cannot express live in
:mod:`simclr_tau.config.validate`, loading and overrides in :mod:`simclr_tau.config.load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


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
class DROConfig:
    """The robust (DRO) τ objective of iSogCLR / SogCLR (``temperature.mode=dro``, ``objective=dro``)."""

    per_sample: bool = False  # false: one global τ; true: one τ_i per training image (iSogCLR)
    rho: float = 0.3  # KL radius ρ: τ settles where the softmax over negatives is ρ nats from uniform
    eta: float = 0.01  # τ step size η of the projected momentum step
    beta: float = 0.9  # momentum weight β of the τ-gradient moving average
    estimator: str = "batch"  # batch: this batch's partition function | sogclr: per-image moving average u_i
    gamma: float = 0.9  # sogclr: weight γ of the new batch estimate in u_i <- (1 - γ) u_i + γ g_i
    gamma_schedule: str = "constant"  # sogclr: constant | cosine (γ from 1 down to gamma over gamma_decay_epochs)
    gamma_decay_epochs: Optional[float] = None  # cosine γ: epochs of the decay; None = the whole run


@dataclass
class AdaptiveConfig:
    """MACL's model-aware τ = init · (1 + alpha · (A − a0)), A = batch mean of the positive cosines."""

    alpha: float = 0.5  # how strongly τ follows the alignment (MACL: 0.5)
    a0: float = 0.0  # reference alignment A_0 (MACL: 0)


@dataclass
class TemperatureConfig:
    """How τ behaves. See :mod:`simclr_tau.temperature` for the formulas."""

    mode: str = "fixed"  # fixed | learnable | conditional | scheduled | dro | adaptive
    init: float = 0.1  # fixed value, or initial value of a learnable τ (dro: τ_0; adaptive: τ_0)
    objective: str = "contrastive"  # conditional: what trains the τ head: contrastive (the loss) | dro (TempNet)
    parametrization: str = "log"  # learnable: log (τ = exp θ) | softplus (τ = softplus θ + eps) | relu (τ = relu θ + eps)
    eps: float = 1e-3  # floor of the softplus / relu parametrizations
    tau_min: Optional[float] = None  # learnable / adaptive: optional lower bound; conditional: default 0.05; dro: 0.05
    tau_max: Optional[float] = None  # learnable / adaptive: optional upper bound; conditional: default 1.0; dro: 0.7
    lr_scale: float = 1.0  # the τ parameters' learning rate = lr_scale x the encoder's; never weight-decayed
    hidden_dim: int = 128  # conditional: MLP width
    depth: int = 2  # conditional: number of linear layers
    detach_input: bool = True  # conditional: read the projection output without backpropagating into the encoder
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # scheduled mode
    dro: DROConfig = field(default_factory=DROConfig)  # dro mode, and conditional with objective=dro
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)  # adaptive mode (MACL)


@dataclass
class LossConfig:
    decoupled: bool = False  # DCL (Yeh et al. 2022): the positive leaves the NT-Xent / InfoNCE denominator


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | cifar100 | stl10 | imagefolder | synthetic | mixture
    root: str = "data"  # dataset directory (fashion_mnist: directory holding the idx .gz files)
    download: bool = False  # let torchvision download fashion_mnist / cifar / stl10 when online
    val_root: Optional[str] = None  # imagefolder: held-out split for evaluation (default: root)
    channels: str = "native"  # native: in_chans as stored (1 for grayscale) | rgb: repeat grayscale to 3
    image_size: Optional[int] = None  # None = the dataset's native size
    subset: Optional[int] = None  # use only the first n training images (debugging, tests)
    # train and evaluate on these class indices only (>= 2, unique; e.g. [0,1,2,3,4,5,6,7]), relabelled 0..K-1 in
    # ascending order of the original index (class names kept); every split is filtered, data.subset then takes the
    # first n kept images; None = every class. `simclr-tau ood` treats the other classes as out-of-distribution
    classes: Optional[List[int]] = None
    pipeline: str = "auto"  # auto | batched (uint8 dataset on the device, augmented in batches) | dataloader (per-sample torchvision in workers); auto = batched for in-memory datasets
    num_workers: int = 2  # DataLoader worker processes per training process (dataloader pipeline)
    folder_cache_mb: float = 1024.0  # imagefolder: decode a tree whose uint8 N x C x S x S fits in this many MiB once into memory (cached on disk) and train it batched; 0 = always per sample
    cache_dir: Optional[str] = None  # imagefolder cache directory; None = $XDG_CACHE_HOME/simclr_tau/folders (~/.cache/...)
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
    stem_pool: bool = True  # ResNet without small_stem: keep the stem's max-pool (False: half the stem's downsampling, 28 px -> 14 px instead of 7; ~4x the FLOPs)
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    proj_layers: int = 2  # linear layers in the projection MLP (BN + ReLU between)
    proj_bn: bool = True  # BatchNorm in the projection MLP (False: a BN-free model, e.g. for exact multi-process checks on CPU)
    proj_out_bn: str = "auto"  # BatchNorm on the projection's output: none | plain (no scale/shift, MoCo v3) | affine (lightly's SimCLR head); auto: plain for MoCo v3, none otherwise
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
    mixed_precision: str = "no"  # no | bf16 | fp16 (a bare YAML `no` or false means "no")
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
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# ---- distillation (simclr-tau distill) -------------------------------------------------------------

@dataclass
class TeacherConfig:
    path: str = ""  # run directory | encoder.safetensors | pretraining checkpoint (checkpoints/step_*.pt)
    model: Optional[Dict[str, Any]] = None  # architecture (ModelConfig fields) of a checkpoint; None: the run's config.yaml
    probe: Optional[str] = None  # kd: a saved teacher probe (teacher_probe.safetensors); None: train one here
    probe_iters: int = 100  # kd: L-BFGS iterations of the teacher's probe


@dataclass
class DistillObjectiveConfig:
    queue_size: int = 4096  # seed: teacher embeddings in the queue (SEED: 65536 on ImageNet)
    alpha: float = 0.5  # kd: weight of the label cross-entropy; 1 - alpha on T²·KL
    ctkd: bool = False  # kd: curriculum temperature (CTKD): learnable T behind a gradient-reversal layer
    grl_lambda_min: float = 0.0  # ctkd: λ at step 0
    grl_lambda_max: float = 1.0  # ctkd: λ at the end of the ramp
    grl_ramp_epochs: Optional[float] = None  # ctkd: cosine ramp length; None = the whole run (CTKD: 10 epochs)


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillObjectiveConfig = field(default_factory=DistillObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # the student; seed: proj_* size its projection to the teacher's width
    temperature: TemperatureConfig = field(default_factory=lambda: TemperatureConfig(init=0.2))  # seed: τ_s | kd: T
    teacher_temperature: TemperatureConfig = field(default_factory=lambda: TemperatureConfig(init=0.01))  # seed: τ_t (SEED: 0.01)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(method="seed"))  # method: seed | kd
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
