#!/usr/bin/env python
"""The CPU recipe search of the time-to-accuracy issue: every candidate's kNN curve, not only the winner's.

Runs ``scripts/bench_tta.py`` once per candidate of ``CANDIDATES`` (a label and its config overrides on top of
``configs/fmnist_simclr_cpu.yaml`` as it stood before the search: resnet10t, ImageNet stem, batch 256, SGD lr 0.3,
τ 0.2), ``--jobs`` at a time with ``--threads`` threads each, skipping every label whose JSON already exists in
``--out`` (restartable: kill it and run it again). Then writes ``<out>/results.md``: one row per candidate with
its kNN top-1 at every measured point, its training images/s and the epoch it reached raw pixels.

    python scripts/tta_search.py --phase arch                  # the architecture candidates, 2 epochs each
    python scripts/tta_search.py --phase all --table-only      # rewrite results.md from the JSON files

Wall times of candidates run two at a time on a 2-core machine are contended figures: compare them with each
other, and measure the winner alone (``bench_tta.py`` with ``--threads`` of the machine) for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
HALF = "model.backbone_kwargs.channels=[32,64,128,256]"
QUARTER = "model.backbone_kwargs.channels=[16,32,64,128]"
NO_POOL = "model.stem_pool=false"
BF16 = "train.mixed_precision=bf16"  # 1.5-1.9x faster fwd+bwd on this CPU (avx512_bf16); the loss stays float32

# phase -> label -> overrides (each phase builds on the best of the one before; the comment says which)
CANDIDATES: Dict[str, Dict[str, List[str]]] = {
    "arch": {  # backbone width x resolution after the stem, at the main job's optimizer and augmentation
        "base": [],
        "half": [HALF],
        "half-nopool": [HALF, NO_POOL],
        "quarter-nopool": [QUARTER, NO_POOL],
        "full-nopool": [NO_POOL],
        "quarter-smallstem": [QUARTER, "model.small_stem=true", "model.backbone_kwargs.stem_width=16"],
    },
    # on the arch phase's best cost-neutral network (half width, no stem pool: 84.18 at epoch 2 vs 82.26 for
    # the main job's network): bf16, then augmentation, τ, batch, optimizer — one change at a time, in bf16
    "recipe": {
        "hn-bf16": [HALF, NO_POOL, BF16],
        "hn-crop0.4": [HALF, NO_POOL, BF16, "augment.crop_scale_min=0.4"],
        "hn-bs128": [HALF, NO_POOL, BF16, "train.batch_size=128"],
        "hn-tau0.1": [HALF, NO_POOL, BF16, "temperature.init=0.1"],
        "hn-tau0.5": [HALF, NO_POOL, BF16, "temperature.init=0.5"],
        "hn-lr0.6": [HALF, NO_POOL, BF16, "optim.lr=0.6"],
        "hn-adamw": [HALF, NO_POOL, BF16, "optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05"],
        "hn-nojitter": [HALF, NO_POOL, BF16, "augment.jitter_p=0"],
    },
    # the recipe phase said: no jitter costs 7 points (76.69), AdamW +0.5, batch 128 +0.35 over hn-bf16's 83.70;
    # τ 0.1 / 0.5, lr 0.6 and crop 0.4 within ±0.2 (one seed each: noise of that size). So: stronger jitter, and
    # the two gains together
    "combine": {
        "hn-jit1.5": [HALF, NO_POOL, BF16, "augment.jitter_strength=1.5"],
        "hn-jit2": [HALF, NO_POOL, BF16, "augment.jitter_strength=2.0"],
        "hn-adamw-bs128": [HALF, NO_POOL, BF16, "optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05",
                           "train.batch_size=128"],
        "hn-adamw-jit2": [HALF, NO_POOL, BF16, "optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05",
                          "augment.jitter_strength=2.0"],
        # jitter 1.5 / 2: 84.41 / 84.71; AdamW with jitter 2: 84.41 (SGD stays); so: further, and with batch 128
        "hn-jit3": [HALF, NO_POOL, BF16, "augment.jitter_strength=3.0"],
        "hn-jit2-bs128": [HALF, NO_POOL, BF16, "augment.jitter_strength=2.0", "train.batch_size=128"],
    },
}


def run_one(label: str, overrides: List[str], args: argparse.Namespace) -> str:
    out = Path(args.out)
    if (out / f"{label}.json").is_file():
        return f"{label}: done before, skipped"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(REPO / "scripts" / "bench_tta.py"), "--label", label, "--out", str(out),
           "--points-per-epoch", str(args.points_per_epoch), args.config, f"train.epochs={args.epochs}",
           "data.num_workers=0", *overrides, *args.overrides]
    log = out / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    tail = log.read_text().strip().splitlines()[-2:] if log.is_file() else []
    return f"{label}: rc={rc} " + " | ".join(tail)


def table(out: Path) -> str:
    """Markdown: one row per candidate JSON of ``out``, best final kNN first."""
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not results:
        return "no results yet\n"
    points = sorted({p["epoch"] for r in results for p in r["curve"]})
    pixels = results[0]["pixels"]
    lines = [f"kNN top-1 (%), k=20, T=0.07, full Fashion-MNIST test set; raw pixels {pixels:.2f}.", "",
             "| candidate | overrides | " + " | ".join(f"ep {e:g}" for e in points) + " | train img/s | epochs to pixels |",
             "|---|---|" + "---:|" * (len(points) + 2)]
    for r in sorted(results, key=lambda r: -r["curve"][-1]["knn"]):
        by_epoch = {p["epoch"]: p["knn"] for p in r["curve"]}
        last = r["curve"][-1]
        speed = last["step"] * r.get("batch_size", 256) / last["seconds"] if last["seconds"] == last["seconds"] else float("nan")
        reach = f"{r['epochs_to_pixels']:g}" if r.get("epochs_to_pixels") is not None else "—"
        cells = " | ".join(f"{by_epoch[e]:.2f}" if e in by_epoch else "" for e in points)
        own = [o for o in r["overrides"] if not o.startswith(("train.epochs=", "data.num_workers="))]
        lines.append(f"| {r['label']} | `{' '.join(own) or '(the base)'}` | {cells} | {speed:.0f} | {reach} |")
    machine = results[0]["machine"]
    lines += ["", f"Machine: {machine}; dates {min(r['date'] for r in results)} – {max(r['date'] for r in results)}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", default="arch", choices=[*CANDIDATES, "all"])
    p.add_argument("--only", nargs="*", default=None, help="labels to run (default: the whole phase)")
    p.add_argument("--config", default="configs/fmnist_simclr_cpu.yaml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--points-per-epoch", type=int, default=2)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/results/tta_search")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("overrides", nargs="*", help="overrides for every candidate (after its own)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        phases = list(CANDIDATES) if args.phase == "all" else [args.phase]
        todo = [(label, ov) for ph in phases for label, ov in CANDIDATES[ph].items()
                if args.only is None or label in args.only]
        with ThreadPoolExecutor(args.jobs) as pool:
            for line in pool.map(lambda c: run_one(c[0], c[1], args), todo):
                print(line, flush=True)
    (out / "results.md").write_text(table(out))
    print(table(out))


if __name__ == "__main__":
    main()
