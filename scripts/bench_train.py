#!/usr/bin/env python
"""Pretraining throughput: images/s of the full training step, measured in one run.

Runs the same config for a few steps with each data pipeline and prints images/s (source images, two
views each) and the ratio:

- ``batched``: the uint8 dataset on the training device, both views augmented in one vectorized call;
- ``dataloader``: torchvision v2 transforms per sample in DataLoader workers (the usual pipeline of
  SimCLR implementations);
- ``lightly``: lightly's own SimCLR (``SimCLRTransform`` on PIL images in DataLoader workers,
  ``SimCLRProjectionHead``, ``NTXentLoss``) with the same timm backbone, batch, τ, optimizer and
  augmentation parameters, in a plain PyTorch loop (needs ``pip install lightly``), as its users run it;
- ``no-augment``: ``batched`` with ``augment.enabled=false`` (identity views): the rest of the step alone
  (normalization, network forward + backward, loss, optimizer), i.e. the ceiling that a faster data path
  could reach with this network; the share of the step spent on augmentation is printed from it.

The first log interval (warm-up: allocator, thread pools, workers) is excluded.

    python scripts/bench_train.py                                   # CPU-sized Fashion-MNIST config
    python scripts/bench_train.py --config configs/fmnist_simclr_gpu.yaml --steps 60 train.batch_size=512
    # the GPU goal (issue 8): ResNet-18, small-image stem, 32 px, batch 512, bf16, 50k images
    python scripts/bench_train.py --config configs/fmnist_simclr_gpu.yaml --steps 100 --log-every 10 \
        --pipelines batched,lightly data.image_size=32 train.mixed_precision=bf16 train.compile=true
    python scripts/bench_train.py train.channels_last=false optim.fused=false --pipelines batched   # ablation
    # a user's small-image folder: the first 10k Fashion-MNIST images as PNGs, cached vs in memory vs per sample
    python scripts/bench_train.py --imagefolder 10000 --pipelines batched,folder,folder-dataloader data.channels=rgb

``--imagefolder N`` writes the first N training images as an ImageFolder tree of PNGs (``root/<class>/i.png``)
and adds the pipelines ``folder`` (``data.name=imagefolder``, default pipeline: the uint8 cache of
:mod:`simclr_tau.data.folders`, trained batched) and ``folder-dataloader`` (the same tree per sample in
DataLoader workers); every pipeline then trains on those N images (``data.subset=N`` in memory). The folder
decodes RGB: compare with ``data.channels=rgb``. The first load's decode into the cache is timed apart.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # lightly_recipe

from simclr_tau.config import load_config  # noqa: E402
from simclr_tau.train.pretrain import run  # noqa: E402


def measure(config: str, pipeline: str, steps: int, log_every: int, overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [
            f"data.pipeline={pipeline}", f"train.max_steps={steps}", f"train.log_every={log_every}",
            f"train.output_dir={out}", "train.run_name=bench", "train.progress=false", "wandb.enabled=false",
            "eval.online_knn_every=0", "train.save_every_epochs=1000", *overrides,
        ])
        result = run(cfg)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r][1:]  # skip warm-up
        return sum(rates) / len(rates)


def write_tree(config: str, overrides: list[str], n: int, root: Path) -> Path:
    """The first ``n`` training images of the config's dataset as PNGs under ``root/<class>/<i>.png``."""
    from PIL import Image

    from simclr_tau.data.datasets import build_pretrain_dataset

    ds = build_pretrain_dataset(load_config(config, [*overrides, "data.channels=native"]).data)
    for i in range(min(n, len(ds))):
        img, label = ds[i]
        d = root / f"{label:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    return root


def measure_lightly(config: str, steps: int, log_every: int, overrides: list[str]) -> float:
    """lightly's SimCLR recipe, same backbone / batch / τ / SGD / augmentation, in a plain loop."""
    import time

    from lightly_recipe import build_lightly_simclr, train_step

    r = build_lightly_simclr(load_config(config, overrides))
    rates, t0, done = [], time.perf_counter(), 0
    for x1, x2 in r.loader:
        train_step(r, x1, x2)
        done += 1
        if done % log_every == 0:
            if r.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            rates.append(log_every * r.loader.batch_size / (now - t0))
            t0 = now
        if done == steps:
            break
    return float(np.mean(rates[1:]))


PIPELINES = ("batched", "dataloader", "lightly", "no-augment", "folder", "folder-dataloader")


def measure_pipeline(pl: str, config: str, steps: int, log_every: int, overrides: list[str],
                     folder_overrides: list[str]) -> float:
    """images/s of pipeline ``pl`` (see the module docstring)."""
    if os.name == "posix":  # DataLoader workers forked as in a plain run (a spawned worker inherits "spawn")
        multiprocessing.set_start_method("fork", force=True)
    if pl == "lightly":
        return measure_lightly(config, steps, log_every, overrides)
    if pl in ("folder", "folder-dataloader"):
        return measure(config, "auto" if pl == "folder" else "dataloader", steps, log_every, folder_overrides)
    if pl == "no-augment":
        return measure(config, "batched", steps, log_every, [*overrides, "augment.enabled=false"])
    return measure(config, pl, steps, log_every, overrides)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fmnist_simclr_cpu.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--pipelines", type=lambda s: s.split(","), default=["batched", "dataloader", "lightly"],
                   help="comma-separated, from: " + ",".join(PIPELINES))
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every pipeline this many times, interleaved; report the medians")
    p.add_argument("--imagefolder", type=int, default=None, metavar="N",
                   help="also measure an ImageFolder tree of the first N images (pipelines folder, folder-dataloader)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    folder: list[str] = []
    folder_overrides: list[str] = []
    if args.imagefolder:
        import time

        from simclr_tau.data.folders import load_folder

        tree = write_tree(args.config, args.overrides, args.imagefolder, Path(tmp.name) / "tree")
        size = load_config(args.config, args.overrides).data.image_size or 28
        folder = ["data.name=imagefolder", f"data.root={tree}", f"data.image_size={size}",
                  f"data.cache_dir={Path(tmp.name) / 'cache'}", "data.channels=native"]
        t0 = time.perf_counter()
        load_folder(tree, load_config(args.config, [*args.overrides, *folder]).data)
        print(f"imagefolder: {args.imagefolder} PNGs, first load (decode into the cache) {time.perf_counter() - t0:.1f} s")
        folder_overrides = [*args.overrides, *folder]  # the tree holds the N images: no data.subset
        args.overrides = [*args.overrides, f"data.subset={args.imagefolder}"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print(f"config {args.config} {' '.join(args.overrides)} | {device} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads")
    unknown = [pl for pl in args.pipelines if pl not in PIPELINES]
    if unknown:
        p.error(f"unknown pipeline(s) {', '.join(unknown)}; accepted: {', '.join(PIPELINES)}")
    if not folder and any(pl.startswith("folder") for pl in args.pipelines):
        p.error("pipelines folder, folder-dataloader need --imagefolder N")
    # each measurement in a fresh interpreter, as a user's run: process-wide state (the thread pool, the
    # allocator, torch flags) never leaks from one pipeline into the next, and a pipeline's place in the order
    # does not change its figure (an in-process A/B measured a 17 % "gain" of torch.set_flush_denormal that
    # vanished with a fresh process per measurement: 1333 vs 1243 images/s, 4 interleaved rounds each)
    # (a ProcessPoolExecutor, not a multiprocessing.Pool: its workers are not daemons, so DataLoader workers can start)
    ctx = multiprocessing.get_context("spawn")
    rates: dict[str, list[float]] = {pl: [] for pl in args.pipelines}
    for rep in range(args.repeats):
        for pl in args.pipelines:
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                rate = pool.submit(measure_pipeline, pl, args.config, args.steps, args.log_every, args.overrides,
                                   folder_overrides).result()
            rates[pl].append(rate)
            print(f"{pl:>12}: {rate:8.1f} images/s (two views each) = {50000 / rate:7.1f} s per 50k-image epoch"
                  + (f"  [round {rep + 1}/{args.repeats}]" if args.repeats > 1 else ""), flush=True)
    results = {pl: float(np.median(v)) for pl, v in rates.items()}
    if args.repeats > 1:
        print("medians over the rounds: " + ", ".join(f"{pl} {v:.0f}" for pl, v in results.items()))
    for other in ("dataloader", "lightly", "folder", "folder-dataloader"):
        if "batched" in results and other in results:
            print(f"ratio simclr_tau (batched) / {other}: {results['batched'] / results[other]:.2f}x")
    if "batched" in results and "no-augment" in results:
        share = 1.0 - results["batched"] / results["no-augment"]
        print(f"augmentation share of the batched step: {100 * share:.0f}% (no-augment {results['no-augment']:.0f} images/s "
              "is the ceiling of this network, loss and optimizer)")
        if "lightly" in results:
            print(f"ratio no-augment ceiling / lightly: {results['no-augment'] / results['lightly']:.2f}x")


if __name__ == "__main__":
    main()
