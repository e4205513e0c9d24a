"""Throughput of the SimCLR augmentation, two views per image, measured in one run:

  (a) torchvision.transforms.v2 per sample in a DataLoader with --workers processes (the CPU path)
  (b) simclr_tau BatchAugment on whole batches (CPU, and CUDA when available)
  (c) kornia.augmentation with the same ops on whole batches (CPU, and CUDA when available)

Data: random uint8 images (n, C, 28, 28) by default, or Fashion-MNIST's idx files with
``--data DIR`` (DIR/train-images-idx3-ubyte.gz). Throughput is augmented views per second, counted
after the first batch (worker start-up and first-call costs are excluded).

    python scripts/bench_augment.py --n 10000
    python scripts/bench_augment.py --data /usr/share/datasets/fashion-mnist --channels 3
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):  # run as a script from a source checkout: make the repository importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simclr_tau.config import AugmentConfig
from simclr_tau.data.augment import BLUR_SIGMA, CROP_RATIO, resolve_augment, simclr_view_transform
from simclr_tau.data.batch_augment import BatchAugment

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def load_images(data: str | None, n: int, channels: int) -> torch.Tensor:
    """(n, C, 28, 28) uint8: Fashion-MNIST training images, or uniform random pixels."""
    if data is None:
        x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    else:
        with gzip.open(Path(data) / "train-images-idx3-ubyte.gz", "rb") as f:
            raw = f.read()
        x = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 1, 28, 28)[:n].copy())
    return x.expand(-1, channels, -1, -1).contiguous() if channels == 3 else x


class TwoViews(Dataset):
    def __init__(self, images: torch.Tensor, transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        return self.transform(img), self.transform(img)


def views_per_second(batches: Iterable, sync: Callable[[], None] = lambda: None) -> float:
    """Iterate (v1, v2) batches; views/s after the first batch."""
    it = iter(batches)
    next(it)
    sync()
    start, views = time.perf_counter(), 0
    for v1, v2 in it:
        views += v1.shape[0] + v2.shape[0]
    sync()
    return views / (time.perf_counter() - start)


def batched(aug: Callable, x: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        yield aug(xb), aug(xb)


def kornia_pipeline(p: dict, size: int, channels: int, mean: list, std: list) -> torch.nn.Module:
    import kornia.augmentation as K

    rgb = channels == 3
    ops = [
        K.RandomResizedCrop((size, size), scale=(p["crop_scale_min"], 1.0), ratio=CROP_RATIO),
        K.RandomHorizontalFlip(p=p["flip_p"]),
        K.ColorJitter(p["brightness"], p["contrast"], p["saturation"] if rgb else 0.0, p["hue"] if rgb else 0.0, p=p["jitter_p"]),
    ]
    if rgb:
        ops.append(K.RandomGrayscale(p=p["grayscale_p"]))
    if p["blur_p"] > 0:
        k = p["blur_kernel"]
        ops.append(K.RandomGaussianBlur((k, k), BLUR_SIGMA, p=p["blur_p"]))
    if p["solarize_p"] > 0:
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=p["solarize_p"]))
    ops.append(K.Normalize(torch.tensor(mean), torch.tensor(std)))
    seq = torch.nn.Sequential(*ops)
    return lambda xb: seq(xb.float().div_(255.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000, help="images (each gives two views)")
    ap.add_argument("--data", default=None, help="directory holding Fashion-MNIST's train-images-idx3-ubyte.gz")
    ap.add_argument("--channels", type=int, default=1, choices=(1, 3), help="3: repeat the gray channel (RGB path)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for (a)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for the batched CPU paths")
    ap.add_argument("--no-kornia", action="store_true")
    args = ap.parse_args()

    x = load_images(args.data, args.n, args.channels)
    size, c = x.shape[-1], args.channels
    cfg = AugmentConfig()
    mean, std = [FMNIST_MEAN] * c, [FMNIST_STD] * c
    p = resolve_augment(cfg, size)
    print(f"{len(x)} images {tuple(x.shape[1:])} ({'Fashion-MNIST' if args.data else 'random'}), two views each, "
          f"batch {args.batch_size}; recipe: " + ", ".join(f"{k}={v:g}" for k, v in p.items() if k != "enabled"))
    rows = []

    view = simclr_view_transform(cfg, size, c, mean, std)
    loader = DataLoader(TwoViews(x, view), batch_size=args.batch_size, num_workers=args.workers)
    rows.append(("a", f"torchvision v2, DataLoader x{args.workers} workers", "cpu", views_per_second(loader)))

    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        xd = x.to(dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        threads = f", {args.threads} thread(s)" if dev == "cpu" else ""
        aug = BatchAugment(cfg, size, c, mean, std).to(dev)
        g = torch.Generator(device=dev).manual_seed(0)
        rows.append(("b", f"BatchAugment{threads}", dev, views_per_second(batched(lambda xb: aug(xb, g), xd, args.batch_size), sync)))
        if not args.no_kornia:
            k = kornia_pipeline(p, size, c, mean, std)
            rows.append(("c", f"kornia.augmentation{threads}", dev, views_per_second(batched(k, xd, args.batch_size), sync)))

    print(f"\n{'':4}{'path':46}{'device':8}{'views/s':>10}")
    for key, name, dev, vps in rows:
        print(f"({key}) {name:46}{dev:8}{vps:10.0f}")
    a = rows[0][3]
    for dev in devices:
        got = {key: vps for key, _, d, vps in rows if d == dev or key == "a"}
        line = f"ratios ({dev}): (b)/(a) = {got['b'] / a:.1f}x"
        if "c" in got:
            line += f", (c)/(a) = {got['c'] / a:.1f}x, (b)/(c) = {got['b'] / got['c']:.1f}x"
        print(line)


if __name__ == "__main__":
    main()
