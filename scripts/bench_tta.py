#!/usr/bin/env python
"""Time to accuracy of a pretraining recipe on Fashion-MNIST: kNN top-1 against epochs and wall time.

Measures what a user waits for, as airbench does for supervised CIFAR-10: the full-test-set kNN top-1
(k = 20, T = 0.07, memory bank = the features of the whole training set) at ``--points-per-epoch`` points
of every epoch, against epochs and against training minutes (evaluation time excluded), with the
raw-pixel kNN of the same evaluator as the line to beat. Prints the epochs and minutes to reach the pixel
baseline and the best value within the budget, and writes ``<out>/<label>.json`` and ``<out>/tta.png``
(every recipe of ``--out`` on shared axes, so candidates measured in separate calls compare in one plot).

    python scripts/bench_tta.py --label main configs/fmnist_simclr_cpu.yaml train.epochs=6
    python scripts/bench_tta.py --label lightly --recipe lightly configs/fmnist_simclr_cpu.yaml train.epochs=6
    python scripts/bench_tta.py --plot-only            # redraw tta.png from the JSON files of --out

``--recipe ours`` trains with ``simclr-tau pretrain`` (checkpoints at the points, evaluated afterwards);
``--recipe lightly`` trains lightly's own SimCLR (``scripts/lightly_recipe.py``: its transforms, head and
loss, the same backbone, batch, τ and SGD, with our lr schedule) and evaluates its encoder at the same
points. Wall times are training seconds: ours from the run's logged images/s, lightly's from the loop.
Benchmarks belong to a quiet machine: say whether it was, and compare curves measured in one session.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # lightly_recipe

from simclr_tau.config import load_config  # noqa: E402

K, T = 20, 0.07
KEY = f"top1_k{K}_t{T:g}"


class Evaluator:
    """Full-test-set kNN top-1 of an encoder on the config's data (train features as the memory bank)."""

    def __init__(self, cfg: Any) -> None:
        from simclr_tau.data.augment import eval_transform
        from simclr_tau.data.datasets import build_eval_datasets, normalization

        self.train, self.test = build_eval_datasets(cfg.data)
        norm = normalization(cfg.data.name, self.train)
        size = cfg.data.image_size or self.train.image_size
        self.transform = eval_transform(size, self.train.channels, norm.mean, norm.std)
        self.batch_size = cfg.eval.batch_size

    def __call__(self, encoder: torch.nn.Module) -> float:
        from simclr_tau.evaluation.features import extract_features
        from simclr_tau.evaluation.knn import knn_eval

        encoder.eval()
        tr_f, tr_y = extract_features(encoder, self.train, self.transform, self.batch_size)
        te_f, te_y = extract_features(encoder, self.test, self.transform, self.batch_size)
        return knn_eval(tr_f, tr_y, te_f, te_y, [K], [T], self.train.num_classes)[KEY]


def pixel_top1(evaluator: Evaluator) -> float:
    from simclr_tau.evaluation.features import PixelEncoder

    return evaluator(PixelEncoder())


def train_seconds(rows: List[Dict[str, Any]], batch_size: int) -> Dict[int, float]:
    """Cumulative training seconds at every logged step, from each row's images/s over its window."""
    out, total, last = {}, 0.0, 0
    for r in rows:
        if "train/images_per_s" in r:
            total += (r["step"] - last) * batch_size / r["train/images_per_s"]
            last = r["step"]
            out[r["step"]] = total
    return out


def run_ours(cfg_path: str, overrides: List[str], points: int, evaluator: Evaluator) -> List[Dict[str, float]]:
    from simclr_tau.models.encoder import build_encoder, load_encoder_weights
    from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint
    from simclr_tau.train.pretrain import run

    from simclr_tau.data.datasets import build_pretrain_dataset

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(cfg_path, [*overrides, f"train.output_dir={out}", "train.run_name=tta", "train.progress=false",
                                     "wandb.enabled=false", "eval.online_knn_every=0", "train.keep_last=100000"])
        spe = len(build_pretrain_dataset(cfg.data)) // cfg.train.batch_size
        every = max(1, spe // points)
        cfg.train.save_every_steps = every
        cfg.train.log_every = every  # one timing row per point
        result = run(cfg)
        rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        seconds = train_seconds(rows, cfg.train.batch_size)
        curve = []
        for ckpt in list_checkpoints(result.run_dir / "checkpoints"):
            state = load_checkpoint(ckpt)
            step = int(state["step"])
            enc, _ = build_encoder(cfg.model, evaluator.train.channels)
            load_encoder_weights(enc, {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")},
                                 str(ckpt))
            curve.append({"step": step, "epoch": step / spe, "seconds": seconds.get(step, float("nan")),
                          "knn": evaluator(enc)})
            print(f"  epoch {step / spe:5.2f}  {curve[-1]['seconds'] / 60:6.2f} min  kNN {curve[-1]['knn']:.2f}", flush=True)
        return curve


def run_lightly(cfg_path: str, overrides: List[str], points: int, evaluator: Evaluator) -> List[Dict[str, float]]:
    import copy

    from lightly_recipe import build_lightly_simclr, train_step

    from simclr_tau.train.optim import lr_at, scaled_lr, set_lr

    cfg = load_config(cfg_path, overrides)
    r = build_lightly_simclr(cfg)
    spe, epochs = r.steps_per_epoch, cfg.train.epochs
    total, every = spe * epochs, max(1, spe // points)
    peak, warmup = scaled_lr(cfg.optim, cfg.train.batch_size), int(round(cfg.optim.warmup_epochs * spe))
    snapshots, step, seconds = [], 0, 0.0
    r.model.train()
    for _ in range(epochs):
        t0 = time.perf_counter()
        for x1, x2 in r.loader:
            set_lr(r.optimizer, lr_at(step, total, warmup, peak, cfg.optim.final_lr_ratio))
            train_step(r, x1, x2)
            step += 1
            if step % every == 0 or step == total:
                if r.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - t0
                snapshots.append((step, seconds, copy.deepcopy(r.model[0].state_dict())))
                t0 = time.perf_counter()
    curve = []
    enc = r.model[0]
    for step, secs, state in snapshots:
        enc.load_state_dict(state)
        curve.append({"step": step, "epoch": step / spe, "seconds": secs, "knn": evaluator(enc)})
        print(f"  epoch {step / spe:5.2f}  {secs / 60:6.2f} min  kNN {curve[-1]['knn']:.2f}", flush=True)
    return curve


def summarize(curve: List[Dict[str, float]], pixels: float) -> Dict[str, Optional[float]]:
    """The first point at or above the pixel line (epochs, minutes) and the best value."""
    hit = next((p for p in curve if p["knn"] >= pixels), None)
    best = max(curve, key=lambda p: p["knn"]) if curve else None
    return {"epochs_to_pixels": hit["epoch"] if hit else None, "minutes_to_pixels": hit["seconds"] / 60 if hit else None,
            "best_knn": best["knn"] if best else None, "best_epoch": best["epoch"] if best else None}


def plot(out: Path, pixels: Optional[float]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import math

    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    ncol = min(4, len(results) + 1)
    rows = math.ceil((len(results) + 1) / ncol)
    legend_in = 0.17 * rows + 0.35  # the legend below the axes gets its own inches: the figure grows with it
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4 + legend_in), sharey=True)
    colors = plt.get_cmap("tab20" if len(results) > 10 else "tab10").colors
    for i, res in enumerate(results):
        c = res["curve"]
        style = dict(marker="o", ms=3, color=colors[i % len(colors)], ls="-" if i < len(colors) else "--",
                     label=res["label"])
        axes[0].plot([p["epoch"] for p in c], [p["knn"] for p in c], **style)
        axes[1].plot([p["seconds"] / 60 for p in c], [p["knn"] for p in c], **style)
    pix = pixels if pixels is not None else next((r["pixels"] for r in results), None)
    for ax, xl in zip(axes, ("epochs", "training minutes (evaluation excluded)")):
        if pix is not None:
            ax.axhline(pix, color="k", ls="--", lw=1, label=f"raw pixels {pix:.2f}")
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"kNN top-1 (%), k={K}, T={T:g}, full test set")
    machine = next((r["machine"] for r in results), "")
    data = next((r.get("dataset", "") for r in results), "")
    fig.suptitle(f"{data} time to accuracy — {machine}", fontsize=10)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, legend_in / (4.4 + legend_in), 1, 0.95))
    path = out / "tta.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/fmnist_simclr_cpu.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value (the candidate recipe)")
    p.add_argument("--label", default=None, help="name of this curve (default: the recipe)")
    p.add_argument("--recipe", choices=("ours", "lightly"), default="ours")
    p.add_argument("--points-per-epoch", type=int, default=2)
    p.add_argument("--out", default="runs/tta", help="results directory (one JSON per label + tta.png)")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        print(f"wrote {plot(out, None)}")
        return
    label = args.label or args.recipe
    cfg = load_config(args.config, args.overrides)
    evaluator = Evaluator(cfg)
    pix_file = out / "pixels.txt"
    pixels = float(pix_file.read_text()) if pix_file.is_file() else pixel_top1(evaluator)
    pix_file.write_text(f"{pixels}\n")
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
               else f"CPU {os.cpu_count()} cores ({platform.machine()}), {torch.get_num_threads()} threads")
    print(f"{label}: {args.recipe} recipe, {args.config} {' '.join(args.overrides)} | {machine} | raw pixels {pixels:.2f}",
          flush=True)
    t0 = time.time()
    curve = (run_ours if args.recipe == "ours" else run_lightly)(args.config, args.overrides, args.points_per_epoch,
                                                                   evaluator)
    summary = summarize(curve, pixels)
    res = {"label": label, "recipe": args.recipe, "config": args.config, "overrides": args.overrides, "machine": machine,
           "dataset": cfg.data.name, "batch_size": cfg.train.batch_size,
           "date": time.strftime("%Y-%m-%d %H:%M"), "wall_minutes_total": (time.time() - t0) / 60, "pixels": pixels,
           "curve": curve, **summary}
    (out / f"{label}.json").write_text(json.dumps(res, indent=2))
    reach = (f"reaches raw pixels ({pixels:.2f}) at epoch {summary['epochs_to_pixels']:.2f} "
             f"({summary['minutes_to_pixels']:.1f} training min)" if summary["epochs_to_pixels"] is not None
             else f"does not reach raw pixels ({pixels:.2f})")
    print(f"{label}: {reach}; best {summary['best_knn']:.2f} at epoch {summary['best_epoch']:.2f}")
    print(f"wrote {out / (label + '.json')} and {plot(out, pixels)}")


if __name__ == "__main__":
    main()
