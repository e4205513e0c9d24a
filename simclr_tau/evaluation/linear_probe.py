"""Linear probe of a frozen encoder: a softmax-regression head on its features.

Protocol (never touching the test set for any choice):

1. carve a validation split from the *training* set (``val_fraction``, seeded, stratified by class);
2. train one head per hyperparameter setting of the grid (learning rate x weight decay) on the rest;
3. choose the setting with the best validation top-1 (ties: the first in grid order);
4. report train / validation / test top-1 (percent) of that head; with ``retrain_full`` a head with the
   chosen setting is also trained on the whole training set and its test accuracy is the headline
   (the held-out head is kept for calibration, which needs logits on data the head never saw).

Features are standardized with the mean and standard deviation of the head's training features
(per dimension; equivalent to a BatchNorm without affine parameters frozen after one pass), so one
learning-rate grid fits encoders whose feature scales differ.

Optimizers (``optimizer``): ``sgd`` (momentum 0.9, coupled L2 weight decay on the weights) and
``adamw`` (decoupled weight decay), mini-batch with a cosine learning-rate schedule over all steps,
no warm-up; ``lbfgs``: full-batch float64 L-BFGS (strong-Wolfe line search) on mean CE + wd/2 ||W||², one
solve per weight decay, each run to its own gradient tolerance (``epochs`` = the iteration cap), the lr grid
unused; it matches scikit-learn's ``LogisticRegression(C = 1 / (N · wd))``. The bias is never decayed.
The SGD / AdamW heads of the whole grid are trained together as one stacked (G, F, C) tensor on the same batches (the update rules are torch's,
applied per head with that head's lr and wd), so a grid costs about as much as one head.

Modes: ``linear_probe`` trains on fixed (cached) features, without augmentation. ``linear_probe_augmented``
follows the published protocol (SimCLR / MoCo linear evaluation): every epoch the frozen encoder (eval
mode) re-encodes random-resized-crop + horizontal-flip views of the training images; validation and
test use the clean features.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from simclr_tau.errors import UserError
from simclr_tau.evaluation.probe_solvers import train_heads_lbfgs, train_heads_minibatch

OPTIMIZERS = ("sgd", "adamw", "lbfgs")
DEFAULT_LRS = {"sgd": (0.01, 0.1, 1.0), "adamw": (1e-3, 1e-2), "lbfgs": (1.0,)}
DEFAULT_WDS = {"sgd": (0.0, 1e-5, 1e-4, 1e-3), "adamw": (0.0, 1e-4, 1e-2), "lbfgs": (1e-5, 1e-4, 1e-3, 1e-2)}
# lbfgs has no wd = 0: on (nearly) separable features that objective has no minimizer, so its head would only
# be wherever the iteration cap stopped it (pass wds=[0.0] explicitly to get that); lbfgs epochs = the cap
DEFAULT_EPOCHS = {"sgd": 30, "adamw": 30, "lbfgs": 1000}


@dataclass
class ProbeConfig:
    optimizer: str = "lbfgs"  # sgd | adamw | lbfgs
    epochs: Optional[int] = None  # None: 30 (sgd/adamw), at most 1000 iterations per head (lbfgs)
    lrs: Optional[Sequence[float]] = None  # learning-rate grid; None: DEFAULT_LRS[optimizer]
    wds: Optional[Sequence[float]] = None  # weight-decay grid; None: DEFAULT_WDS[optimizer]
    batch_size: int = 256  # sgd / adamw mini-batch (0 = full batch)
    momentum: float = 0.9  # sgd
    betas: Tuple[float, float] = (0.9, 0.999)  # adamw
    val_fraction: float = 0.1  # of the training set, held out for the hyperparameter choice
    stratified: bool = True
    seed: int = 0
    retrain_full: bool = False  # also train the chosen setting on train + val and report its test accuracy

    def resolved(self) -> "ProbeConfig":
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"linear probe optimizer={self.optimizer!r} is not valid; accepted: {', '.join(OPTIMIZERS)}")
        out = ProbeConfig(**asdict(self))
        out.epochs = self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.optimizer]
        out.lrs = tuple(float(v) for v in (self.lrs if self.lrs else DEFAULT_LRS[self.optimizer]))
        out.wds = tuple(float(v) for v in (self.wds if self.wds else DEFAULT_WDS[self.optimizer]))
        if out.epochs < 1:
            raise UserError(f"linear probe epochs={out.epochs} must be >= 1")
        if not 0.0 <= out.val_fraction < 1.0:
            raise UserError(f"linear probe val_fraction={out.val_fraction} must lie in [0, 1)")
        if any(not v > 0 for v in out.lrs) or any(v < 0 for v in out.wds):
            raise UserError(f"linear probe grid: learning rates must be > 0 and weight decays >= 0 (got {out.lrs}, {out.wds})")
        return out

    def grid(self) -> List[Tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.wds]  # type: ignore[union-attr]


@dataclass
class LinearHead:
    """A trained probe: logits = ((x − mean) / std) W + b."""

    weight: Tensor  # F x C
    bias: Tensor  # C
    mean: Tensor  # F
    std: Tensor  # F

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, feats: Tensor) -> Tensor:
        return ((feats.float() - self.mean) / self.std) @ self.weight + self.bias  # N x C

    def accuracy(self, feats: Tensor, labels: Tensor, k: int = 1) -> float:
        check_labels(labels, self.num_classes, "evaluation")
        return topk_accuracy(self.logits(feats), labels, k)


@dataclass
class ProbeResult:
    metrics: Dict[str, Any]  # JSON-ready: accuracies (percent), chosen setting, grid
    head: LinearHead  # the head trained without the validation split (the calibrated one)
    val_logits: Tensor
    val_labels: Tensor
    test_logits: Tensor
    test_labels: Tensor
    full_head: Optional[LinearHead] = None  # retrain_full


def topk_accuracy(logits: Tensor, labels: Tensor, k: int = 1) -> float:
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return 100.0 * (top == labels.view(-1, 1)).any(1).double().mean().item()


def check_labels(labels: Tensor, num_classes: int, what: str) -> None:
    """UserError if ``labels`` fall outside the probe's ``num_classes`` classes."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"{what} labels span classes {int(labels.min())}..{int(labels.max())} but the probe has "
                        f"{num_classes} classes; evaluate on a dataset with the same label set")


def split_train_val(labels: Tensor, val_fraction: float, seed: int = 0, stratified: bool = True) -> Tuple[Tensor, Tensor]:
    """Disjoint sorted index tensors (train, val) of a seeded split; stratified keeps class proportions."""
    labels = labels.long().cpu()
    g = torch.Generator().manual_seed(seed)
    if val_fraction <= 0:
        return torch.arange(len(labels)), torch.zeros(0, dtype=torch.long)
    if stratified:
        val = []
        for c in torch.unique(labels):
            idx = torch.nonzero(labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            val.append(idx[: int(round(val_fraction * len(idx)))])
        val_idx = torch.cat(val)
    else:
        val_idx = torch.randperm(len(labels), generator=g)[: int(round(val_fraction * len(labels)))]
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[val_idx] = False
    return torch.nonzero(mask).flatten(), val_idx.sort().values


def feature_stats(feats: Tensor) -> Tuple[Tensor, Tensor]:
    f = feats.float()
    return f.mean(0), f.std(0, unbiased=False).clamp_min(1e-6)


def _shuffled_batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> Callable[[int], Iterable[Tuple[Tensor, Tensor]]]:
    n = x.shape[0]
    bs = n if batch_size <= 0 else min(batch_size, n)

    def batches(epoch: int) -> Iterable[Tuple[Tensor, Tensor]]:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            yield x[idx], y[idx]

    return batches


def _fit_grid(x: Tensor, y: Tensor, C: int, cfg: ProbeConfig, grid: Sequence[Tuple[float, float]],
              epoch_batches: Optional[Callable[[int], Iterable[Tuple[Tensor, Tensor]]]] = None,
              steps_per_epoch: Optional[int] = None) -> List[Tuple[Tensor, Tensor]]:
    """Heads (W, b) for every grid point, trained on standardized features x (or on ``epoch_batches``)."""
    if cfg.optimizer == "lbfgs":
        if epoch_batches is not None:
            raise UserError("linear probe: lbfgs needs fixed features; use --mode fast or --optimizer sgd|adamw")
        return train_heads_lbfgs(x, y, C, [wd for _, wd in grid], cfg.epochs)  # type: ignore[arg-type]
    if epoch_batches is None:
        epoch_batches = _shuffled_batches(x, y, cfg.batch_size, cfg.seed)
        bs = x.shape[0] if cfg.batch_size <= 0 else min(cfg.batch_size, x.shape[0])
        steps_per_epoch = math.ceil(x.shape[0] / bs)
    W, b = train_heads_minibatch(epoch_batches, steps_per_epoch, x.shape[1], C, grid, cfg, x.device)  # type: ignore[arg-type]
    return [(W[i], b[i]) for i in range(len(grid))]


def _select(heads: List[LinearHead], grid: Sequence[Tuple[float, float]], val_x: Tensor, val_y: Tensor
            ) -> Tuple[int, List[Dict[str, float]]]:
    table = [{"lr": lr, "wd": wd, "val_top1": h.accuracy(val_x, val_y) if len(val_y) else float("nan")}
             for h, (lr, wd) in zip(heads, grid)]
    if len(val_y) == 0:
        if len(grid) > 1:
            raise UserError("linear probe: choosing among several hyperparameters needs a validation split (val_fraction > 0)")
        return 0, table
    best = max(range(len(grid)), key=lambda i: (table[i]["val_top1"], -i))  # ties -> first in grid order
    return best, table


def _prepare(train_labels: Tensor, test_labels: Tensor, num_classes: Optional[int], cfg: ProbeConfig
             ) -> Tuple[int, ProbeConfig, Tensor, Tensor]:
    cfg = cfg.resolved()
    C = num_classes if num_classes is not None else int(max(int(train_labels.max()), int(test_labels.max()))) + 1
    check_labels(train_labels, C, "training")
    check_labels(test_labels, C, "test")
    tr_idx, va_idx = split_train_val(train_labels, cfg.val_fraction, cfg.seed, cfg.stratified)
    return C, cfg, tr_idx, va_idx


def _finish(mode: str, cfg: ProbeConfig, grid, best, table, heads, tr, va, te, full_head=None) -> ProbeResult:
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = tr, va, te
    head = heads[best]
    metrics: Dict[str, Any] = {
        "mode": mode,
        "optimizer": cfg.optimizer,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "standardization": "per-dimension mean/std of the head's training features",
        "n_train": int(len(tr_y)), "n_val": int(len(va_y)), "n_test": int(len(te_y)),
        "chosen": {"lr": grid[best][0], "wd": grid[best][1]},
        "grid": table,
        "train_top1": head.accuracy(tr_x, tr_y),
        "val_top1": table[best]["val_top1"],
        "test_top1": head.accuracy(te_x, te_y),
        "test_top5": head.accuracy(te_x, te_y, 5),
    }
    if full_head is not None:
        metrics["test_top1_heldout_head"] = metrics["test_top1"]
        metrics["test_top1"] = full_head.accuracy(te_x, te_y)
        metrics["test_top5"] = full_head.accuracy(te_x, te_y, 5)
        metrics["retrain_full"] = True
    return ProbeResult(metrics, head, head.logits(va_x), va_y, head.logits(te_x), te_y, full_head)


def linear_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 num_classes: Optional[int] = None, cfg: ProbeConfig = ProbeConfig()) -> ProbeResult:
    """Fast mode: the protocol of the module docstring on fixed (cached) features."""
    C, cfg, tr_idx, va_idx = _prepare(train_labels, test_labels, num_classes, cfg)
    x, y = train_feats.float(), train_labels.long()
    tr, va, te = (x[tr_idx], y[tr_idx]), (x[va_idx], y[va_idx]), (test_feats.float(), test_labels.long())
    mean, std = feature_stats(tr[0])
    grid = cfg.grid()
    heads = [LinearHead(W, b, mean, std) for W, b in _fit_grid((tr[0] - mean) / std, tr[1], C, cfg, grid)]
    best, table = _select(heads, grid, *va)
    full_head = None
    if cfg.retrain_full and len(va_idx):
        m2, s2 = feature_stats(x)
        W, b = _fit_grid((x - m2) / s2, y, C, cfg, [grid[best]])[0]
        full_head = LinearHead(W, b, m2, s2)
    return _finish("fast", cfg, grid, best, table, heads, tr, va, te, full_head)


def augmented_view_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                             crop_scale_min: float = 0.08) -> Callable[[Tensor], Tensor]:
    """uint8 (C, H, W) -> float (C, S, S): random resized crop (scale (crop_scale_min, 1)), horizontal
    flip, normalize: the linear-evaluation augmentation of SimCLR / MoCo (torchvision v2)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.RandomResizedCrop(image_size, scale=(crop_scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(), v2.Normalize(list(mean), list(std)), v2.ToPureTensor(),
    ])


def linear_probe_augmented(
    encoder: torch.nn.Module, train_ds: Any, aug_transform: Callable, train_feats: Tensor, train_labels: Tensor,
    test_feats: Tensor, test_labels: Tensor, num_classes: Optional[int] = None, cfg: ProbeConfig = ProbeConfig(optimizer="sgd"),
    num_workers: int = 0, progress: bool = False,
) -> ProbeResult:
    """Standard mode: heads trained on features of freshly augmented views, recomputed every epoch by the
    frozen encoder (eval mode, no_grad). ``train_feats`` / ``test_feats`` are the clean features (same order
    as ``train_ds``), used for the standardization statistics, validation, test and train accuracy."""
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from simclr_tau.evaluation.features import _module_device, _PerSample

    C, cfg, tr_idx, va_idx = _prepare(train_labels, test_labels, num_classes, cfg)
    if cfg.optimizer == "lbfgs":
        raise UserError("linear probe: lbfgs needs fixed features; use --mode fast or --optimizer sgd|adamw")
    if len(train_feats) != len(train_ds):
        raise ValueError("train_feats must hold one row per training image, in dataset order")
    x, y = train_feats.float(), train_labels.long()
    tr, va, te = (x[tr_idx], y[tr_idx]), (x[va_idx], y[va_idx]), (test_feats.float(), test_labels.long())
    device = _module_device(encoder)

    def run(indices: Tensor, mean: Tensor, std: Tensor, grid: Sequence[Tuple[float, float]], desc: str):
        views = _PerSample(Subset(train_ds, indices.tolist()), aug_transform)
        bs = len(indices) if cfg.batch_size <= 0 else min(cfg.batch_size, len(indices))
        steps = math.ceil(len(indices) / bs)
        was_training = encoder.training
        encoder.eval()

        def epoch_batches(epoch: int):
            g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            loader = DataLoader(views, batch_size=bs, shuffle=True, generator=g, num_workers=num_workers)
            for xb, yb in tqdm(loader, desc=f"{desc} epoch {epoch + 1}", disable=None if progress else True, leave=False):
                with torch.no_grad():
                    f = encoder(xb.to(device)).float()  # frozen: features of this epoch's views
                yield (f - mean.to(device)) / std.to(device), torch.as_tensor(yb).to(device)

        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # the augmentation draws
                W, b = train_heads_minibatch(epoch_batches, steps, x.shape[1], C, grid, cfg, device)
        finally:
            encoder.train(was_training)
        return [LinearHead(W[i].cpu(), b[i].cpu(), mean, std) for i in range(len(grid))]

    mean, std = feature_stats(tr[0])
    grid = cfg.grid()
    heads = run(tr_idx, mean, std, grid, "probe")
    best, table = _select(heads, grid, *va)
    full_head = None
    if cfg.retrain_full and len(va_idx):
        m2, s2 = feature_stats(x)
        full_head = run(torch.arange(len(y)), m2, s2, [grid[best]], "probe (train+val)")[0]
    return _finish("augmented", cfg, grid, best, table, heads, tr, va, te, full_head)
