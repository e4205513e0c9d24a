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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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

    import numpy as np
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    from simclr_tau.data.augment import resolve_augment
    from simclr_tau.data.datasets import build_pretrain_dataset, normalization
    from simclr_tau.models import build_encoder
    from simclr_tau.train.optim import scaled_lr

    cfg = load_config(config, overrides)
    ds = build_pretrain_dataset(cfg.data)
    norm = normalization(cfg.data.name, ds)
    size = cfg.data.image_size or ds.image_size
    a = resolve_augment(cfg.augment, size)
    transform = SimCLRTransform(
        input_size=size, cj_prob=a["jitter_p"], cj_strength=a["brightness"] / 0.8, cj_bright=0.8, cj_contrast=0.8,
        cj_sat=0.8, cj_hue=0.2, min_scale=a["crop_scale_min"], random_gray_scale=a["grayscale_p"],
        gaussian_blur=a["blur_p"], hf_prob=a["flip_p"], vf_prob=0.0, rr_prob=0.0,
        normalize={"mean": norm.mean, "std": norm.std},
    )

    class PilDataset(Dataset):
        def __len__(self) -> int:
            return len(ds)

        def __getitem__(self, i: int):
            x = ds.images[i].permute(1, 2, 0).numpy()
            img = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
            return transform(img)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(PilDataset(), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                        pin_memory=device.type == "cuda")
    backbone, dim = build_encoder(cfg.model, ds.channels)
    head = SimCLRProjectionHead(dim, cfg.model.proj_hidden_dim, cfg.model.proj_dim)
    model = torch.nn.Sequential(backbone, head).to(device)
    amp = cfg.train.mixed_precision  # the same autocast as ours: the comparison is about the data path
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, enabled=amp != "no")
    loss_fn = NTXentLoss(temperature=cfg.temperature.init)
    opt = torch.optim.SGD(model.parameters(), lr=scaled_lr(cfg.optim, cfg.train.batch_size), momentum=0.9,
                          weight_decay=cfg.optim.weight_decay)
    rates, t0, done = [], time.perf_counter(), 0
    for x1, x2 in loader:
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        with autocast:
            loss = loss_fn(model(x1), model(x2))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        done += 1
        if done % log_every == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            rates.append(log_every * cfg.train.batch_size / (now - t0))
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
