"""Datasets: every source yields ``(uint8 image C x H x W, int label)``.

Small-image datasets (Fashion-MNIST, CIFAR-10/100, STL-10, synthetic) are held in memory as one uint8
tensor ``images`` (N, C, H, W), so they can also be moved whole to the training device and augmented
there in batches. ImageFolder trees are decoded per sample from disk, or once into an in-memory tensor when their
images are small (:mod:`simclr_tau.data.folders`).

Fashion-MNIST (Xiao et al. 2017) is read straight from its idx files (``train-images-idx3-ubyte.gz``, ...)
in any directory that holds them: the Debian package ``dataset-fashion-mnist`` installs them in
/usr/share/datasets/fashion-mnist; torchvision's download layout (``<root>/FashionMNIST/raw``) works too,
and ``data.download=true`` lets torchvision fetch them when online.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from simclr_tau.config.validate import check_classes
from simclr_tau.data.folders import CorruptImageError, FolderImageDataset, load_folder  # noqa: F401 (re-exported)
from simclr_tau.data.images import ImageDataset, TensorImageDataset
from simclr_tau.errors import UserError

FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally .gz): magic (2 zero bytes, dtype code, ndim), dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise UserError(f"{path}: truncated idx file ({data.size} values, header says {math.prod(dims)})")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for d in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist"):
        for name in (stem + ".gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def load_fashion_mnist(root: str | Path, split: str, download: bool = False) -> TensorImageDataset:
    """Fashion-MNIST ``split`` ('train' 60k | 'test' 10k) as a 1-channel 28x28 uint8 dataset."""
    root = Path(root)
    img_stem, lbl_stem = FMNIST_FILES[split]
    img, lbl = _find_idx(root, img_stem), _find_idx(root, lbl_stem)
    if (img is None or lbl is None) and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=split == "train", download=True)
        img, lbl = _find_idx(root, img_stem), _find_idx(root, lbl_stem)
    if img is None or lbl is None:
        raise UserError(
            f"data.root={root}: no Fashion-MNIST idx files ({img_stem}.gz); install them with "
            "'apt-get install dataset-fashion-mnist' (data.root=/usr/share/datasets/fashion-mnist) "
            "or set data.download=true when online"
        )
    images = torch.from_numpy(_read_idx(img).copy()).unsqueeze(1)  # N x 1 x 28 x 28
    labels = torch.from_numpy(_read_idx(lbl).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{img} and {lbl} hold different numbers of samples")
    return TensorImageDataset(images, labels, FMNIST_CLASSES)


def _torchvision_dataset(name: str, root: str, split: str, download: bool) -> TensorImageDataset:
    from torchvision import datasets as tvd

    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=split == "train", download=download)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # N x 3 x 32 x 32
            return TensorImageDataset(images, torch.tensor(ds.targets), ds.classes)
        # STL-10: 'train+unlabeled' is the usual pretraining split; labels -1 for unlabeled.
        stl_split = {"train": "train", "test": "test", "pretrain": "train+unlabeled"}[split]
        ds = tvd.STL10(root, split=stl_split, download=download)
        return TensorImageDataset(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64)), ds.classes)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise UserError(f"data.root={root}: {name} not found ({e}); set data.download=true when online") from None


def make_synthetic(n: int, num_classes: int, size: int, channels: int = 1, seed: int = 0,
                   noise: float = 0.15) -> TensorImageDataset:
    """A small learnable dataset: each class is a fixed smooth random pattern, each image a noisy, shifted copy.

    The class patterns are the same for every ``seed`` (so train and test splits share their classes);
    ``seed`` draws only the noise and the shifts.
    """
    coarse = torch.rand(num_classes, channels, 4, 4, generator=torch.Generator().manual_seed(12345))
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    x = protos[labels] + noise * torch.randn(n, channels, size, size, generator=g)
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2)) for xi, s in zip(x, shifts)])
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return TensorImageDataset(images, labels, [f"class{i}" for i in range(num_classes)])


def _to_channels(ds: ImageDataset, channels: str) -> ImageDataset:
    """Apply ``data.channels``: 'rgb' repeats a grayscale channel three times."""
    if channels == "rgb" and ds.channels == 1:
        if ds.images is None:
            ds.channels = 3
        else:
            ds.images = ds.images.expand(-1, 3, -1, -1).contiguous()
            ds.channels = 3
    return ds


def _build(cfg: Any, split: str) -> ImageDataset:
    name = cfg.name
    if name == "fashion_mnist":
        ds: ImageDataset = load_fashion_mnist(cfg.root, "test" if split == "test" else "train", cfg.download)
    elif name in ("cifar10", "cifar100", "stl10"):
        ds = _torchvision_dataset(name, cfg.root, split, cfg.download)
    elif name == "imagefolder":
        root = Path(cfg.val_root if split == "test" and cfg.val_root else cfg.root)
        if not root.is_dir():
            raise UserError(f"data.root={root}: directory not found; point data.root (or data.val_root) at an "
                            "ImageFolder tree root/<class>/<image>")
        ds = load_folder(root, cfg)
    elif name == "synthetic":
        n = cfg.synthetic_size if split != "test" else max(cfg.synthetic_size // 4, cfg.synthetic_classes)
        ds = make_synthetic(n, cfg.synthetic_classes, cfg.synthetic_image_size, seed=0 if split != "test" else 1,
                            noise=cfg.synthetic_noise)
    elif name == "mixture":
        raise UserError("a mixture has no single labelled split: evaluate on one source, e.g. "
                        "'simclr-tau knn RUN_DIR data.name=fashion_mnist data.sources=[] data.root=...'")
    else:
        raise UserError(f"data.name={name!r} is not valid")
    ds = _to_channels(ds, cfg.channels)
    return keep_classes(ds, cfg.classes) if cfg.classes is not None else ds


def build_pretrain_dataset(cfg: Any) -> ImageDataset:
    """The training set used for pretraining (STL-10: train+unlabeled), the images of ``data.classes`` if set,
    cut to ``data.subset`` if set (the first n images kept)."""
    ds = _build(cfg, "pretrain" if cfg.name == "stl10" else "train")
    if cfg.subset is not None:
        ds = subset(ds, cfg.subset)
    return ds


def build_eval_datasets(cfg: Any) -> Tuple[ImageDataset, ImageDataset]:
    """(labelled train split, test split) for kNN / linear evaluation, both cut to ``data.classes`` if set."""
    return _build(cfg, "train"), _build(cfg, "test")


def subset(ds: ImageDataset, n: int) -> ImageDataset:
    """The first ``n`` samples of an in-memory dataset (a deterministic, class-mixed subset for FMNIST/CIFAR)."""
    if ds.images is None:
        raise UserError("data.subset is only supported for in-memory datasets (not imagefolder)")
    n = min(n, len(ds))
    return TensorImageDataset(ds.images[:n], ds.labels[:n], ds.classes)


def keep_classes(ds: ImageDataset, classes: Sequence[int]) -> ImageDataset:
    """The images of ``ds`` whose label is in ``classes`` (``data.classes``), relabelled 0..K-1 in ascending order
    of the original label, class names kept (a K-class dataset to every reader: kNN votes, probe heads, top-5).

    Unlabelled images (STL-10's label -1) are dropped: nothing says they belong to the kept classes.
    """
    check_classes(classes, ds.num_classes)
    if ds.images is None:
        raise UserError("data.classes is only supported for in-memory datasets (imagefolder: a tree that fits "
                        "data.folder_cache_mb)")
    kept = sorted(int(c) for c in classes)
    mask = torch.isin(ds.labels, torch.tensor(kept))
    new_label = torch.full((ds.num_classes,), -1, dtype=torch.long)
    new_label[kept] = torch.arange(len(kept))
    return TensorImageDataset(ds.images[mask], new_label[ds.labels[mask]], [ds.classes[c] for c in kept])


@dataclass
class Normalization:
    mean: List[float]
    std: List[float]


# Per-channel statistics of the standard training splits (pixel values in [0, 1]).
KNOWN_STATS = {
    "fashion_mnist": Normalization([0.2860], [0.3530]),
    "cifar10": Normalization([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": Normalization([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "stl10": Normalization([0.4467, 0.4398, 0.4066], [0.2603, 0.2566, 0.2713]),
    "imagefolder": Normalization([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # ImageNet
}


def normalization(name: str, ds: ImageDataset) -> Normalization:
    """Mean/std for ``ds``: the published statistics, or computed from the images (synthetic)."""
    if name in KNOWN_STATS:
        stats = KNOWN_STATS[name]
    else:
        assert ds.images is not None
        x = ds.images.float().div_(255)
        stats = Normalization(x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    if ds.channels != len(stats.mean):  # grayscale repeated to RGB, or RGB stats for a gray folder
        m, s = sum(stats.mean) / len(stats.mean), sum(stats.std) / len(stats.std)
        stats = Normalization([m] * ds.channels, [s] * ds.channels)
    return stats
