"""Representation diagnostics of a trained encoder on the test set.

- Alignment and uniformity (Wang & Isola 2020; :mod:`simclr_tau.losses.diagnostics`) of the encoder's
  L2-normalized features (the representation that kNN and the linear probe read, not the projection).
  Alignment needs positive pairs: two independent SimCLR views (``simclr_view_transform`` with the run's
  ``augment`` config, seeded) of the same ``n`` test images. Uniformity is computed on the clean
  (eval-transform) features of those images.
- For a run with a conditional temperature (``temperature.mode=conditional``): the per-sample τ of every
  test image, computed by the run's own τ head. The exported encoder holds only the backbone, so the
  method (encoder + projector (+ predictor) + τ head) is rebuilt from the config and loaded from the last
  checkpoint ``run_dir/checkpoints/step_*.pt``; τ_i = temperature(projection of the clean image). Reported:
  AUROC of τ as an uncertainty score for kNN errors (positive = misclassified; 0.5 = uninformative,
  > 0.5 = higher τ on errors), mean τ on correct / wrong predictions and per class. Runs without a
  per-sample τ get ``{"skipped": reason}``. :func:`image_tau` (τ of any images: a conditional τ only) and
  :func:`training_tau` (also a per-sample dro table's τ_i of its training images) serve ``simclr-tau ood`` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from simclr_tau.errors import UserError
from simclr_tau.evaluation.features import extract_features
from simclr_tau.evaluation.ood import auroc
from simclr_tau.losses.diagnostics import alignment, uniformity


def _subset(dataset: Any, n: Optional[int], seed: int) -> Any:
    from simclr_tau.data.datasets import TensorImageDataset

    if n is None or n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if getattr(dataset, "images", None) is not None:
        return TensorImageDataset(dataset.images[idx], dataset.labels[idx], dataset.classes)
    return torch.utils.data.Subset(dataset, idx.tolist())


def alignment_uniformity(
    encoder: nn.Module, dataset: Any, clean_transform: Callable, view_transform: Callable, n: Optional[int] = 1000,
    batch_size: int = 256, seed: int = 0, accelerator: Any = None,
) -> Dict[str, float]:
    """``{"alignment": ..., "uniformity": ..., "n": ...}`` on a seeded subset of ``n`` images (lower is better)."""
    data = _subset(dataset, n, seed)
    clean, _ = extract_features(encoder, data, clean_transform, batch_size, accelerator)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        v1, _ = extract_features(encoder, data, view_transform, batch_size, accelerator)
        v2, _ = extract_features(encoder, data, view_transform, batch_size, accelerator)
    return {"alignment": float(alignment(v1, v2)), "uniformity": float(uniformity(clean)), "n": len(data)}


def _last_checkpoint(run_dir: Path) -> Optional[Path]:
    from simclr_tau.train.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir / "checkpoints")
    return found[-1] if found else None


def load_method(run_dir: Path, cfg: Any, in_chans: int) -> nn.Module:
    """The run's method (encoder, projector, τ head) from its last checkpoint, in eval mode."""
    from simclr_tau.methods import build_method
    from simclr_tau.train.checkpoint import load_checkpoint

    path = _last_checkpoint(run_dir)
    if path is None:
        raise UserError(f"{run_dir}/checkpoints: no step_*.pt checkpoint to read the temperature head from")
    state = load_checkpoint(path)
    method = build_method(cfg, in_chans, 1, 1)
    try:
        method.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not match the run's config ({str(e).splitlines()[0][:300]})") from None
    return method.eval()


@torch.no_grad()
def per_sample_tau(method: nn.Module, dataset: Any, transform: Callable, batch_size: int = 256) -> Tensor:
    """τ_i of every image: temperature(projection) (MoCo v3: of the predictor's output), shape (N,)."""
    from simclr_tau.evaluation.features import make_loader

    device = next(method.parameters()).device
    taus: List[Tensor] = []
    for x, _ in make_loader(dataset, transform, batch_size):
        z = method.projector(method.encoder(x.to(device)))
        if getattr(method, "predictor", None) is not None:
            z = method.predictor(z)
        taus.append(method.temperature(z).float().cpu().view(-1))
    return torch.cat(taus)


TABLE_ONLY = "n/a (τ_i exists only for training images)"


def image_tau(run_dir: Optional[Path], cfg: Any, dataset: Any, transform: Callable, in_chans: int,
              batch_size: int = 256, device: Any = "cpu") -> Tuple[Optional[Tensor], str]:
    """(τ_i of every image of ``dataset`` by the run's τ network, "") or (None, why there is none).

    Only a conditional τ (objective contrastive or dro) is a function of the image; a per-sample dro τ is a
    table indexed by training image (:data:`TABLE_ONLY`), every other mode one τ for all images.
    """
    t = cfg.temperature
    if t.mode == "dro" and t.dro.per_sample:
        return None, TABLE_ONLY
    if t.mode != "conditional":
        return None, f"temperature.mode={t.mode}: no per-sample τ"
    if run_dir is None or _last_checkpoint(Path(run_dir)) is None:
        return None, "no checkpoint (run_dir/checkpoints/step_*.pt) holding the τ head"
    method = load_method(Path(run_dir), cfg, in_chans).to(device)
    return per_sample_tau(method, dataset, transform, batch_size), ""


def training_tau(run_dir: Optional[Path], cfg: Any, train_ds: Any, transform: Callable, in_chans: int,
                 batch_size: int = 256, device: Any = "cpu") -> Tuple[Optional[Tensor], str]:
    """(τ_i of the training images ``train_ds``, "") or (None, why there is none): the τ network's
    (:func:`image_tau`), or the per-sample dro table's row of each image when ``train_ds`` is the pretraining
    set in its order (the table is indexed by the pretraining dataset's index)."""
    from simclr_tau.data.datasets import build_pretrain_dataset
    from simclr_tau.train.checkpoint import load_checkpoint

    t = cfg.temperature
    if not (t.mode == "dro" and t.dro.per_sample):
        return image_tau(run_dir, cfg, train_ds, transform, in_chans, batch_size, device)
    path = _last_checkpoint(Path(run_dir)) if run_dir is not None else None
    if path is None:
        return None, "no checkpoint (run_dir/checkpoints/step_*.pt) holding the τ table"
    table = load_checkpoint(path)["model"].get("temperature.tau")
    pre = build_pretrain_dataset(cfg.data)
    if table is None or table.numel() != len(pre):
        return None, f"{path}: no τ table of the pretraining set's {len(pre)} images"
    same = (len(pre) == len(train_ds) and pre.images is not None and getattr(train_ds, "images", None) is not None
            and torch.equal(pre.images, train_ds.images) and torch.equal(pre.labels, train_ds.labels))
    if not same:
        return None, "the pretraining set is not the train split (data.subset, STL-10's unlabelled images)"
    return table.float().cpu(), ""


def conditional_tau_report(
    run_dir: Optional[Path], cfg: Any, dataset: Any, transform: Callable, knn_correct: Tensor, in_chans: int,
    batch_size: int = 256, class_names: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """AUROC of per-sample τ for kNN errors and mean τ per class; ``{"skipped": why}`` when not applicable."""
    tau, why = image_tau(run_dir, cfg, dataset, transform, in_chans, batch_size)
    if tau is None:
        return {"skipped": why}
    labels = dataset.labels if hasattr(dataset, "labels") else torch.tensor([dataset[i][1] for i in range(len(dataset))])
    wrong = ~knn_correct.bool()
    per_class = {}
    for c in torch.unique(labels).tolist():
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        per_class[name] = float(tau[labels == c].mean())
    return {
        "auroc_tau_vs_knn_error": auroc(tau, wrong),
        "tau_mean": float(tau.mean()),
        "tau_std": float(tau.std()) if len(tau) > 1 else 0.0,
        "tau_mean_correct": float(tau[~wrong].mean()) if (~wrong).any() else float("nan"),
        "tau_mean_wrong": float(tau[wrong].mean()) if wrong.any() else float("nan"),
        "tau_mean_per_class": per_class,
        "n": int(len(tau)),
    }


def knn_diagnostics(t: Any, accelerator: Any, test_ds: Any, tr_f: Tensor, tr_y: Tensor, te_f: Tensor, te_y: Tensor,
                    k: int, T: float, weighted: bool, num_classes: int, batch_size: int, diag_n: int = 1000,
                    seed: int = 0) -> Dict[str, Any]:
    """The ``knn`` command's diagnostics of a :class:`~simclr_tau.evaluation.targets.Target`: alignment and
    uniformity of ``diag_n`` test images (two augmented views as positives), and, for a run with a conditional
    τ, :func:`conditional_tau_report` against the kNN (k, T) errors."""
    from simclr_tau.data.augment import eval_transform, simclr_view_transform
    from simclr_tau.evaluation.knn import knn_search, topk_correct, vote
    from simclr_tau.evaluation.targets import PIXELS

    clean = eval_transform(t.image_size, t.channels, t.mean, t.std)
    views = simclr_view_transform(t.cfg.augment, t.image_size, t.channels, t.mean, t.std)
    out: Dict[str, Any] = alignment_uniformity(t.encoder, test_ds, clean, views, diag_n, batch_size, seed,
                                               accelerator)
    out["positive_pairs"] = "two simclr_view_transform views (run's augment config) of the same test images"
    if t.kind == PIXELS or t.random_init:
        out["conditional_tau"] = {"skipped": "no temperature head (pixels / random init)"}
        return out
    sims, idx = knn_search(tr_f, te_f, k)
    correct = topk_correct(vote(sims, idx, tr_y, k, T, num_classes, weighted), te_y, 1)
    out["conditional_tau"] = conditional_tau_report(t.run_dir, t.cfg, test_ds, clean, correct, t.channels, batch_size,
                                                    getattr(test_ds, "classes", None))
    if "auroc_tau_vs_knn_error" in out["conditional_tau"]:
        out["conditional_tau"]["knn_setting"] = {"k": k, "T": T}
    return out
