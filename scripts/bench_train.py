#!/usr/bin/env python
"""Pretraining throughput: images/s of the full training step, measured in one run.

Runs the same config for a few steps with each data pipeline and prints images/s (source images, two
views each) and the ratio:

- ``batched``: the uint8 dataset on the training device, both views augmented in one vectorized call;
- ``dataloader``: torchvision v2 transforms per sample in DataLoader workers (the usual pipeline of
  SimCLR implementations);
- ``lightly``: lightly's own SimCLR (``SimCLRTransform`` on PIL images in DataLoader workers,
  ``SimCLRProjectionHead``, ``NTXentLoss``) with the same timm backbone, batch, τ, optimizer and
  augmentation parameters, in a plain PyTorch loop (needs ``pip install lightly``).

The first log interval (warm-up: allocator, thread pools, workers) is excluded.

    python scripts/bench_train.py                                   # CPU-sized Fashion-MNIST config
    python scripts/bench_train.py --config configs/fmnist_simclr_gpu.yaml --steps 60 train.batch_size=512
    # the GPU goal (issue 8): ResNet-18, small-image stem, 32 px, batch 512, bf16, 50k images
    python scripts/bench_train.py --config configs/fmnist_simclr_gpu.yaml --steps 100 --log-every 10 \
        --pipelines batched,lightly data.image_size=32 train.mixed_precision=bf16 train.compile=true
    python scripts/bench_train.py train.channels_last=false optim.fused=false --pipelines batched   # ablation
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/fmnist_simclr_cpu.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--pipelines", type=lambda s: s.split(","), default=["batched", "dataloader", "lightly"],
                   help="comma-separated: batched,dataloader,lightly")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print(f"config {args.config} {' '.join(args.overrides)} | {device} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads")
    results = {}
    for pl in args.pipelines:
        if pl == "lightly":
            results[pl] = measure_lightly(args.config, args.steps, args.log_every, args.overrides)
        else:
            results[pl] = measure(args.config, pl, args.steps, args.log_every, args.overrides)
        print(f"{pl:>12}: {results[pl]:8.1f} images/s (two views each) = {50000 / results[pl]:7.1f} s per 50k-image epoch",
              flush=True)
    for other in ("dataloader", "lightly"):
        if "batched" in results and other in results:
            print(f"ratio simclr_tau (batched) / {other}: {results['batched'] / results[other]:.2f}x")


if __name__ == "__main__":
    main()
