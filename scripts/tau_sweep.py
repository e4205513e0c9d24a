#!/usr/bin/env python
"""Which τ works? Pretrain one config under six temperature settings, evaluate each, compare them.

    python scripts/tau_sweep.py [CONFIG] [a.b=value ...] [--name PREFIX] [--linear] [--dry-run]
    python scripts/tau_sweep.py configs/fmnist_simclr_cpu.yaml train.epochs=1 --dry-run

Settings (on top of CONFIG and the overrides):

    fixed-0.07, fixed-0.2, fixed-0.5   temperature.mode=fixed, temperature.init=τ
    learnable                          temperature.mode=learnable, init 0.1 (τ = exp θ, trained with the encoder)
    conditional                        temperature.mode=conditional, init 0.1 (per-sample τ from an MLP head)
    cosine                             temperature.mode=scheduled, cosine 0.5 -> 0.07 over the run

For each: ``python -m simclr_tau pretrain`` into ``<train.output_dir>/<PREFIX>-<setting>``, then
``python -m simclr_tau knn RUN_DIR`` (and ``linear`` with --linear); finally ``python -m simclr_tau compare``
on every run that finished, into ``<train.output_dir>/<PREFIX>-compare`` (or --out). A failed run is reported
and left out of the comparison; the exit status is 1 if any step failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]

SETTINGS: Dict[str, List[str]] = {
    "fixed-0.07": ["temperature.mode=fixed", "temperature.init=0.07"],
    "fixed-0.2": ["temperature.mode=fixed", "temperature.init=0.2"],
    "fixed-0.5": ["temperature.mode=fixed", "temperature.init=0.5"],
    "learnable": ["temperature.mode=learnable", "temperature.init=0.1"],
    "conditional": ["temperature.mode=conditional", "temperature.init=0.1"],
    "cosine": ["temperature.mode=scheduled", "temperature.schedule.kind=cosine",
               "temperature.schedule.start=0.5", "temperature.schedule.end=0.07"],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="configs/fmnist_simclr_cpu.yaml", help="base config (default: %(default)s)")
    p.add_argument("overrides", nargs="*", help="overrides a.b=value for every run (e.g. train.epochs=1)")
    p.add_argument("--name", default=None, help="run-name prefix (default: tausweep-<time>)")
    p.add_argument("--only", nargs="+", choices=list(SETTINGS), default=None, help="run only these settings")
    p.add_argument("--linear", action="store_true", help="also run the linear probe (+ calibration) on each run")
    p.add_argument("--out", default=None, help="comparison output directory (default <output_dir>/<PREFIX>-compare)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def output_dir(overrides: List[str]) -> str:
    """train.output_dir from the overrides, else from the config's default (runs)."""
    for o in reversed(overrides):
        if o.startswith("train.output_dir="):
            return o.split("=", 1)[1]
    return "runs"


def plan(args: argparse.Namespace) -> Tuple[List[Tuple[str, str, List[List[str]]]], str]:
    """[(setting, run_dir, commands)] and the comparison's output directory."""
    if "=" in args.config and not Path(args.config).is_file():  # only overrides were given
        args.overrides.insert(0, args.config)
        args.config = build_parser().get_default("config")
    if not Path(args.config).is_file() and (REPO / args.config).is_file():  # repo-relative, run from elsewhere
        args.config = str(REPO / args.config)
    prefix = args.name or f"tausweep-{time.strftime('%Y%m%d-%H%M%S')}"
    out_root = output_dir(args.overrides)
    py = [sys.executable, "-m", "simclr_tau"]
    runs = []
    for name in args.only or list(SETTINGS):
        run_name = f"{prefix}-{name}"
        run_dir = str(Path(out_root) / run_name)
        cmds = [py + ["pretrain", args.config, *args.overrides, *SETTINGS[name], f"train.run_name={run_name}"],
                py + ["knn", run_dir, *args.overrides]]
        if args.linear:
            cmds.append(py + ["linear", run_dir, *args.overrides])
        runs.append((name, run_dir, cmds))
    return runs, args.out or str(Path(out_root) / f"{prefix}-compare")


def compare_command(run_dirs: List[str], out: str) -> List[str]:
    return [sys.executable, "-m", "simclr_tau", "compare", *run_dirs, "--out", out]


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    runs, out = plan(args)
    if args.dry_run:
        for _, _, cmds in runs:
            for c in cmds:
                print(shlex.join(c))
        print(shlex.join(compare_command([d for _, d, _ in runs], out)))
        return 0
    # `python -m simclr_tau` must import this checkout even when it is not installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    failed, finished = [], []
    for name, run_dir, cmds in runs:
        for c in cmds:
            print(f"\n$ {shlex.join(c)}", flush=True)
            rc = subprocess.call(c, env=env)
            if rc != 0:
                print(f"{name}: step failed (exit {rc}); left out of the comparison", file=sys.stderr, flush=True)
                failed.append(name)
                break
        else:
            finished.append(run_dir)
    if not finished:
        print("no run finished: nothing to compare", file=sys.stderr)
        return 1
    cmd = compare_command(finished, out)
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    rc = subprocess.call(cmd, env=env)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or rc else 0


if __name__ == "__main__":
    sys.exit(main())
