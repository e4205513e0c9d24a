#!/usr/bin/env python
"""Which τ works? Pretrain one config under six temperature settings, evaluate each, compare them.

    python scripts/tau_sweep.py [CONFIG] [a.b=value ...] [--name PREFIX] [--linear] [--select rankme] [--dry-run]
    python scripts/tau_sweep.py configs/fmnist_simclr_cpu.yaml train.epochs=1 --dry-run
    python scripts/tau_sweep.py [a.b=value ...] --name PREFIX --select-only     # pick among finished runs

Settings (on top of CONFIG and the overrides):

    fixed-0.07, fixed-0.2, fixed-0.5   temperature.mode=fixed, temperature.init=τ
    learnable                          temperature.mode=learnable, init 0.1 (τ = exp θ, trained with the encoder)
    conditional                        temperature.mode=conditional, init 0.1 (per-sample τ from an MLP head)
    cosine                             temperature.mode=scheduled, cosine 0.5 -> 0.07 over the run

For each: ``python -m simclr_tau pretrain`` into ``<train.output_dir>/<PREFIX>-<setting>``, then
``python -m simclr_tau knn RUN_DIR`` (and ``linear`` with --linear); finally ``python -m simclr_tau compare``
on every run that finished, into ``<train.output_dir>/<PREFIX>-compare`` (or --out). A failed run is reported
and left out of the comparison; the exit status is 1 if any step failed.

``--select rankme`` then picks a setting without labels: the run whose final ``online_rankme`` (RankMe,
Garrido et al. 2023, of the encoder's test-split features at the last online kNN evaluation) is highest,
and prints where that setting ranks among the runs by each final kNN top-1 and by the linear probe
(rank 1 = best), i.e. how good a label-free choice would have been. The online evaluation is switched on
(``eval.online_knn_every=1``) when the config leaves it off. ``--select-only`` runs nothing: it makes the
same pick among the existing run directories ``<train.output_dir>/<PREFIX>-<setting>`` of ``--name PREFIX``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, installed or not

from simclr_tau.records.run_data import knn_label, knn_order  # noqa: E402

RANKME = "online_rankme"  # logged by the online kNN evaluation (simclr_tau.evaluation.knn.online_knn)
LINEAR = "linear/test_top1"

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
    p.add_argument("--select", choices=["rankme"], default=None,
                   help="after the sweep, pick the run of highest final online RankMe (label-free) and print "
                        "where it ranks by kNN / linear accuracy")
    p.add_argument("--select-only", action="store_true",
                   help="run nothing: make the --select pick among the existing runs of --name PREFIX")
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
    extra = online_eval_overrides(args.config, args.overrides) if args.select and not args.select_only else []
    # the W&B group is the experiment (this sweep); the run names and tau_mode tags tell its settings apart
    group = [] if any(o.startswith("wandb.group=") for o in args.overrides) else [f"wandb.group={prefix}"]
    runs = []
    for name in args.only or list(SETTINGS):
        run_name = f"{prefix}-{name}"
        run_dir = str(Path(out_root) / run_name)
        cmds = [py + ["pretrain", args.config, *args.overrides, *group, *extra, *SETTINGS[name], f"train.run_name={run_name}"],
                py + ["knn", run_dir, *args.overrides]]
        if args.linear:
            cmds.append(py + ["linear", run_dir, *args.overrides])
        runs.append((name, run_dir, cmds))
    return runs, args.out or str(Path(out_root) / f"{prefix}-compare")


def compare_command(run_dirs: List[str], out: str) -> List[str]:
    return [sys.executable, "-m", "simclr_tau", "compare", *run_dirs, "--out", out]


def online_eval_overrides(config: str, overrides: List[str]) -> List[str]:
    """``["eval.online_knn_every=1"]`` when the config leaves the online evaluation (which logs RankMe) off."""
    from simclr_tau.config import load_config
    from simclr_tau.errors import UserError

    try:
        every = load_config(config, list(overrides)).eval.online_knn_every
    except UserError:
        return []  # pretraining reports the bad config itself
    return [] if every else ["eval.online_knn_every=1"]


# ---- label-free selection ------------------------------------------------------------------------------

@dataclass
class Selection:
    """The run a label-free criterion picks, and how it ranks by each labelled metric."""

    pick: str  # label of the picked run (the sweep's setting)
    score: float  # its criterion value (final online RankMe)
    scores: Dict[str, Optional[float]]  # every run's criterion value (None: not logged)
    ranks: Dict[str, Optional[Tuple[int, int]]]  # metric -> (rank of the pick, runs evaluated); None: pick not evaluated
    values: Dict[str, Optional[float]]  # metric -> the pick's value
    best: Dict[str, Optional[Tuple[str, float]]]  # metric -> (best run, its value); None: no run evaluated


def final_value(run: Any, key: str) -> Optional[float]:
    """A run's final finite value of ``key``: from its final metrics (RunData.final or a plain dict), else the
    last finite one of its logged rows (a RunData whose final metrics do not hold ``key``)."""
    final = run if isinstance(run, Mapping) else getattr(run, "final", {})
    v = final.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    if hasattr(run, "series"):
        ys = run.series(key)[1]
        return ys[-1] if ys else None
    return None


def _finals(runs: Mapping[str, Any] | Sequence[Any]) -> Dict[str, Any]:
    return dict(runs) if isinstance(runs, Mapping) else {r.name: r for r in runs}


def ranked_metrics(runs: Mapping[str, Any] | Sequence[Any]) -> List[str]:
    """The labelled metrics to rank by: every final kNN top-1 of any run (by k, then T), then the linear probe."""
    keys = {k for r in _finals(runs).values() for k in (r if isinstance(r, Mapping) else r.final)}
    return sorted((k for k in keys if k.startswith("knn/top1_")), key=knn_order) + [LINEAR]


def rank_of(values: Mapping[str, Optional[float]], name: str) -> Optional[Tuple[int, int]]:
    """(rank of ``name``, runs with a value): 1 + the number of runs strictly better (higher); ties share a rank."""
    v = values.get(name)
    if v is None:
        return None
    present = [x for x in values.values() if x is not None]
    return 1 + sum(x > v for x in present), len(present)


def select_by_rankme(runs: Mapping[str, Any] | Sequence[Any], metrics: Optional[Sequence[str]] = None,
                     criterion: str = RANKME) -> Selection:
    """Pick the run of highest final ``criterion`` (default online RankMe; ties: the first run) and rank it
    by each of ``metrics`` (default :func:`ranked_metrics`), higher is better.

    ``runs``: ``{label: RunData or dict of final metrics}`` or a list of RunData (labelled by name).
    ValueError if no run has a finite value of ``criterion``.
    """
    finals = _finals(runs)
    scores = {name: final_value(r, criterion) for name, r in finals.items()}
    if all(v is None for v in scores.values()):
        raise ValueError(f"no run logged {criterion}: pretrain with eval.online_knn_every > 0 (the online kNN "
                         f"evaluation computes it)")
    pick = max((n for n, v in scores.items() if v is not None), key=lambda n: scores[n])  # max keeps the first tie
    metrics = list(metrics) if metrics is not None else ranked_metrics(finals)
    ranks, values, best = {}, {}, {}
    for m in metrics:
        vals = {name: final_value(r, m) for name, r in finals.items()}
        ranks[m], values[m] = rank_of(vals, pick), vals[pick]
        present = [(n, v) for n, v in vals.items() if v is not None]
        best[m] = max(present, key=lambda nv: nv[1]) if present else None
    return Selection(pick, scores[pick], scores, ranks, values, best)


def format_selection(sel: Selection) -> str:
    """The pick, every run's RankMe, and where the pick ranks by each metric (rank 1 = best)."""
    n = sum(v is not None for v in sel.scores.values())
    lines = [f"RankMe picks {sel.pick} (RankMe {sel.score:.2f}; label-free: the highest final {RANKME} "
             f"of the {n} run{'s' * (n != 1)} that logged it)",
             "  RankMe: " + ", ".join(f"{name} {'-' if v is None else f'{v:.2f}'}" for name, v in sel.scores.items()),
             f"  where {sel.pick} ranks among the runs (1 = best):"]
    labels = {m: ("linear probe top-1" if m == LINEAR else knn_label(m)) for m in sel.ranks}
    width = max((len(f"{labels[m]} ({m})") for m in sel.ranks), default=0)
    for m, r in sel.ranks.items():
        head = f"    {f'{labels[m]} ({m})':<{width}}  "
        best = sel.best[m]
        if r is None:
            lines.append(head + "not evaluated" + (f"  best: {best[0]} {best[1]:.2f}" if best else " (no run has it)"))
            continue
        tail = "" if r[0] == 1 or best is None else f"  best: {best[0]} {best[1]:.2f}"
        lines.append(head + f"{r[0]} of {r[1]}  ({sel.values[m]:.2f}){tail}")
    return "\n".join(lines)


def select_and_print(labelled_dirs: Sequence[Tuple[str, str]]) -> int:
    """Load ``[(setting, run_dir)]``, print the RankMe pick; 0, or 1 if no run could be read or had RankMe."""
    from simclr_tau.errors import UserError
    from simclr_tau.records.run_data import load_run_dir

    runs = {}
    for name, d in labelled_dirs:
        try:
            runs[name] = load_run_dir(d)
        except UserError as e:
            print(f"{name}: {e}; left out of the selection", file=sys.stderr)
    if not runs:
        print("no run to select from", file=sys.stderr)
        return 1
    try:
        sel = select_by_rankme(runs)
    except ValueError as e:
        print(f"--select rankme: {e}", file=sys.stderr)
        return 1
    print("\n" + format_selection(sel), flush=True)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.select_only:
        if not args.name:
            parser.error("--select-only needs --name PREFIX (the prefix of the sweep's run directories)")
        args.select = args.select or "rankme"
    runs, out = plan(args)
    if args.select_only:
        return select_and_print([(name, run_dir) for name, run_dir, _ in runs])
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
            finished.append((name, run_dir))
    if not finished:
        print("no run finished: nothing to compare", file=sys.stderr)
        return 1
    cmd = compare_command([d for _, d in finished], out)
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    rc = subprocess.call(cmd, env=env)
    if args.select:
        rc = select_and_print(finished) or rc
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or rc else 0


if __name__ == "__main__":
    sys.exit(main())
