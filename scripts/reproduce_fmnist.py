#!/usr/bin/env python
"""The τ study on Fashion-MNIST: pretrain every τ mode, evaluate each, tabulate, compare.

    python scripts/reproduce_fmnist.py --preset cpu                 # 2-core CPU: 12 runs, ~1.5 h (2 at a time)
    python scripts/reproduce_fmnist.py --preset gpu --jobs 1        # one GPU, ResNet-18, 100 epochs per run
    python scripts/reproduce_fmnist.py --preset cpu --dry-run       # print every command, run nothing
    python scripts/reproduce_fmnist.py --preset cpu --only simclr-fixed-0.2 train.epochs=1   # a subset, overridden

Runs (one backbone, budget and seed set per preset; the preset's two configs hold everything else):

    simclr-fixed-{0.07,0.2,0.5}     fixed τ
    simclr-learnable-{log,softplus,relu}   learnable scalar τ, init 0.2, each parametrization
    simclr-conditional              per-sample τ from an MLP on the (detached) projection, init 0.2, in [0.05, 1]
    simclr-cosine                   scheduled τ: cosine from 0.5 down to 0.1 over the run
    simclr-dro-{global,per-sample,per-sample-sogclr}   τ by the robust (iSogCLR) objective, init 0.2 in [0.05, 0.7]
    simclr-dro-*-rho1               the same with ρ = 1 (and η = 0.05 for per-sample τ)
    simclr-conditional-dro          TempNet-style τ head trained by the robust objective
    simclr-adaptive                 MACL's alignment-following τ, τ_0 = 0.2
    simclr-dcl-fixed-0.2            decoupled NT-Xent (DCL), fixed τ 0.2
    mocov2-fixed-0.2, mocov2-learnable-log

Every run is pretrained with ``python -m simclr_tau pretrain`` and evaluated with ``simclr-tau knn`` (FAISS,
k=20/T=0.07 and k=200/T=0.1, plus alignment/uniformity of test views) and ``simclr-tau linear`` (L-BFGS
softmax probe on cached features, weight decay chosen on a validation split of the training set; ECE before
and after temperature scaling). Baselines, evaluated by the same code: raw pixels (kNN, linear probe) and
the random-init encoder (kNN, linear probe); the Fashion-MNIST paper's classical results are quoted.

Seeds: ``--seeds`` for every run, and ``--spread-seeds`` for the ``--spread-runs`` only (the spread a table
needs to say whether a difference between τ modes is larger than seed noise). ``--jobs N`` runs N
pipelines at once (CPU: each gets cores/N threads, which on small models beats one job with all cores).

The script is restartable: a finished step (encoder exported, knn.json, linear.json) is skipped, and an
interrupted pretraining resumes from its last checkpoint. Outputs under ``--out`` (default runs/fmnist-study):
``<run>-s<seed>/`` run directories, ``logs/``, ``baselines/``, ``compare/`` (plots, report.html),
``results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, installed or not

from simclr_tau.records.run_data import final_tau, knn_label, knn_order, load_run_dir  # noqa: E402

PRESETS: Dict[str, Dict[str, Any]] = {
    # backbone / epochs / batch live in the configs; the comments there say why
    "cpu": {"simclr": "configs/fmnist_study_cpu.yaml", "mocov2": "configs/fmnist_study_mocov2_cpu.yaml",
            "seeds": [0], "spread_seeds": [1], "jobs": 2},
    "gpu": {"simclr": "configs/fmnist_simclr_gpu.yaml", "mocov2": "configs/fmnist_mocov2_gpu.yaml",
            "seeds": [0, 1, 2], "spread_seeds": [], "jobs": 1},
}

LEARNABLE = ["temperature.mode=learnable", "temperature.init=0.2"]
DRO = ["temperature.mode=dro", "temperature.init=0.2"]
RUNS: Dict[str, Dict[str, Any]] = {
    "simclr-fixed-0.07": {"method": "simclr", "overrides": ["temperature.mode=fixed", "temperature.init=0.07"]},
    "simclr-fixed-0.2": {"method": "simclr", "overrides": ["temperature.mode=fixed", "temperature.init=0.2"]},
    "simclr-fixed-0.5": {"method": "simclr", "overrides": ["temperature.mode=fixed", "temperature.init=0.5"]},
    "simclr-learnable-log": {"method": "simclr", "overrides": LEARNABLE + ["temperature.parametrization=log"]},
    "simclr-learnable-softplus": {"method": "simclr", "overrides": LEARNABLE + ["temperature.parametrization=softplus"]},
    "simclr-learnable-relu": {"method": "simclr", "overrides": LEARNABLE + ["temperature.parametrization=relu"]},
    "simclr-conditional": {"method": "simclr", "overrides": ["temperature.mode=conditional", "temperature.init=0.2",
                                                             "temperature.tau_min=0.05", "temperature.tau_max=1.0"]},
    "simclr-cosine": {"method": "simclr", "overrides": ["temperature.mode=scheduled", "temperature.schedule.kind=cosine",
                                                        "temperature.schedule.start=0.5", "temperature.schedule.end=0.1"]},
    # τ by the robust objective (issue 16): init 0.2 like the other learned modes, so that the encoder loss
    # scale 1/τ_0 matches NT-Xent's at fixed 0.2 and the preset's learning rate carries over
    "simclr-dro-global": {"method": "simclr", "overrides": DRO},
    "simclr-dro-per-sample": {"method": "simclr", "overrides": DRO + ["temperature.dro.per_sample=true"]},
    "simclr-dro-per-sample-sogclr": {"method": "simclr", "overrides": DRO + ["temperature.dro.per_sample=true",
                                                                               "temperature.dro.estimator=sogclr"]},
    # ρ = 1: iSogCLR's default ρ = 0.3 settles τ at ~0.44 on this data (KL(p‖U) at τ = 0.2 is ~0.9 with 510
    # negatives); per-sample τ_i get one step per epoch, so η = 0.05 lets them move within 6 epochs
    "simclr-dro-global-rho1": {"method": "simclr", "overrides": DRO + ["temperature.dro.rho=1.0"]},
    "simclr-dro-per-sample-rho1": {"method": "simclr", "overrides": DRO + ["temperature.dro.per_sample=true",
                                                                             "temperature.dro.rho=1.0", "temperature.dro.eta=0.05"]},
    "simclr-dro-per-sample-sogclr-rho1": {"method": "simclr", "overrides": DRO + [
        "temperature.dro.per_sample=true", "temperature.dro.estimator=sogclr", "temperature.dro.rho=1.0",
        "temperature.dro.eta=0.05"]},
    "simclr-conditional-dro": {"method": "simclr", "overrides": ["temperature.mode=conditional", "temperature.objective=dro",
                                                                 "temperature.init=0.2", "temperature.tau_min=0.05",
                                                                 "temperature.tau_max=1.0"]},
    "simclr-adaptive": {"method": "simclr", "overrides": ["temperature.mode=adaptive", "temperature.init=0.2"]},
    "simclr-dcl-fixed-0.2": {"method": "simclr", "overrides": ["temperature.mode=fixed", "temperature.init=0.2",
                                                               "loss.decoupled=true"]},
    "mocov2-fixed-0.2": {"method": "mocov2", "overrides": ["temperature.mode=fixed", "temperature.init=0.2"]},
    "mocov2-learnable-log": {"method": "mocov2", "overrides": LEARNABLE + ["temperature.parametrization=log"]},
}
SPREAD_RUNS = ["simclr-fixed-0.2", "simclr-learnable-log"]

# Xiao, Rasul & Vollgraf 2017, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
# Algorithms" (arXiv:1708.07747), Table 3 / the repository's benchmark: best test accuracy per classifier.
PAPER_BASELINES = {"SVC (rbf, C=10)": 89.7, "KNeighbors (k=5, L1, distance)": 85.4, "LogisticRegression (C=1, L1)": 84.2}



TAU_STATS = ("tau_p1", "tau_p50", "tau_p99", "tau_at_min", "tau_at_max")
REFERENCE = "simclr-fixed-0.2"  # what every learned τ is paired against
# two-sided 95 % quantiles of Student's t, by degrees of freedom (scipy is not a dependency)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

# the figures of a row besides the kNN columns: metric names of the run record (summary.json)
FIGURES = ("linear/test_top1", "calib/ece_before", "calib/ece_after", "diag/alignment", "diag/uniformity",
           "train/images_per_s")


@dataclass
class Step:
    cmd: List[str]
    output: Optional[Path]  # the file whose existence means the step is done (None: always run)


@dataclass
class Job:
    name: str  # RUNS key
    seed: int
    run_dir: Path
    steps: List[Step] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.name}-s{self.seed}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value for every run (e.g. train.epochs=1)")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--out", default="runs/fmnist-study", help="study directory (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=list(RUNS), default=None, help="run only these settings")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds for every run (preset default)")
    p.add_argument("--spread-seeds", type=int, nargs="*", default=None,
                   help="extra seeds for --spread-runs only (preset default; none: no extra seeds)")
    p.add_argument("--spread-runs", nargs="*", choices=list(RUNS), default=SPREAD_RUNS)
    p.add_argument("--jobs", type=int, default=None, help="pipelines run at once (preset default)")
    p.add_argument("--no-baselines", action="store_true", help="skip the pixel and random-init baselines")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild compare/ and results.md from the finished runs, train and evaluate nothing")
    return p


def python_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "simclr_tau", *args]


def plan(args: argparse.Namespace) -> List[Job]:
    """One Job per (setting, seed) with its pretrain / knn / linear steps."""
    preset = PRESETS[args.preset]
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    spread = args.spread_seeds if args.spread_seeds is not None else preset["spread_seeds"]
    out = Path(args.out)
    jobs = []
    for name in args.only or list(RUNS):
        spec = RUNS[name]
        run_seeds = list(seeds) + [s for s in spread if name in args.spread_runs and s not in seeds]
        for seed in run_seeds:
            job = Job(name, seed, out / f"{name}-s{seed}")
            pre = python_cmd("pretrain", str(REPO / preset[spec["method"]]), *spec["overrides"], *args.overrides,
                             f"train.seed={seed}", f"train.output_dir={out}", f"train.run_name={job.label}",
                             "train.progress=false")
            if job.run_dir.is_dir() and not (job.run_dir / "encoder.safetensors").is_file():
                pre += ["--resume", "auto"]  # an interrupted run continues from its last checkpoint
            ev = job.run_dir / "eval"
            job.steps = [Step(pre, job.run_dir / "encoder.safetensors"),
                         Step(python_cmd("knn", str(job.run_dir), "--no-progress"), ev / "knn.json"),
                         Step(python_cmd("linear", str(job.run_dir), "--no-progress"), ev / "linear.json")]
            jobs.append(job)
    return jobs


def reference_job(jobs: List[Job]) -> Optional[Job]:
    """The run whose architecture the random-init baseline uses (the first SimCLR run)."""
    return next((j for j in jobs if RUNS[j.name]["method"] == "simclr"), None)


def baseline_steps(args: argparse.Namespace, jobs: List[Job]) -> Tuple[List[Step], List[Step]]:
    """(raw pixels, random-init encoder) steps, kNN + linear each. The random-init ones read the reference
    run's config.yaml and write eval/knn_random_init.json, linear_random_init.json next to its own results."""
    config = str(REPO / PRESETS[args.preset]["simclr"])
    pix = Path(args.out) / "baselines" / "pixels"
    pixels = [Step(python_cmd(sub, "pixels", "--config", config, "--out", str(pix), "--no-progress", *args.overrides),
                   pix / f"{sub}.json") for sub in ("knn", "linear")]
    ref = reference_job(jobs)
    random_init = [] if ref is None else [
        Step(python_cmd(sub, str(ref.run_dir), "--random-init", "--no-progress"),
             ref.run_dir / "eval" / f"{sub}_random_init.json") for sub in ("knn", "linear")]
    return pixels, random_init


def compare_step(args: argparse.Namespace, jobs: List[Job]) -> Step:
    """The comparison of the runs; the raw-pixel baseline's directory joins it when its results exist (the
    random-init results sit in the reference run's summary, which compare reads anyway)."""
    pix = Path(args.out) / "baselines" / "pixels"
    pixels = [str(pix)] if not args.no_baselines and any((pix / n).is_file() for n in ("knn.json", "linear.json")) else []
    return Step(python_cmd("compare", *[str(j.run_dir) for j in jobs], *pixels, "--out", str(Path(args.out) / "compare"),
                           "--metric", "diag/alignment", "--metric", "diag/uniformity",
                           *(["--no-baselines"] if args.no_baselines else [])), None)


def run_steps(label: str, steps: List[Step], log_dir: Path, env: Dict[str, str]) -> bool:
    """Run ``steps`` in order (skipping finished ones), appending to ``log_dir/<label>.log``. True if all passed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{label}.log", "a") as log:
        for step in steps:
            if step.output is not None and step.output.is_file():
                continue
            sub, t0 = step.cmd[3], time.time()
            log.write(f"\n$ {shlex.join(step.cmd)}\n")
            log.flush()
            rc = subprocess.call(step.cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            seconds = time.time() - t0
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
            print(f"[{time.strftime('%H:%M:%S')}] {label}: {sub} {status} in {seconds:.0f} s", flush=True)
            with open(log_dir / "timings.jsonl", "a") as f:  # one line per step: the table's wall times
                f.write(json.dumps({"label": label, "step": sub, "seconds": round(seconds, 1), "rc": rc}) + "\n")
            if rc != 0:
                return False
    return True


# ---- the table -----------------------------------------------------------------------------------------

def step_seconds(out: Path) -> Dict[Tuple[str, str], float]:
    """{(label, step): seconds} of the last successful execution of each step (logs/timings.jsonl)."""
    path = out / "logs" / "timings.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {(r["label"], r["step"]): r["seconds"] for r in rows if r["rc"] == 0}


def knn_columns(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """The kNN top-1 metric names present in ``rows`` (knn/top1_k20_t0.07, ...), sorted by k then T."""
    return sorted({k for r in rows for k in r if k.startswith("knn/top1_")}, key=knn_order)


def run_row(job: Job, seconds: Dict[Tuple[str, str], float]) -> Dict[str, Any]:
    """One run's figures, read with the comparison's own loader (summary.json merged over metrics.jsonl)."""
    row: Dict[str, Any] = {"run": job.name, "seed": job.seed, "run_dir": str(job.run_dir)}
    if not (job.run_dir / "summary.json").is_file():
        return row  # not started / still in its first steps
    r = load_run_dir(job.run_dir)
    row.update({k: v for k, v in r.final.items() if k.startswith("knn/top1_") or k in FIGURES})
    row["tau"] = final_tau(r)  # scalar τ, or the batch mean of a per-sample τ
    for k in TAU_STATS:  # a dro τ's state: quantiles of all τ_i, the fraction of them at a bound
        if f"train/{k}" in r.final:
            row[k] = r.final[f"train/{k}"]
    pre = seconds.get((job.label, "pretrain"))
    row["pretrain_min"] = None if pre is None else pre / 60
    return row


def _renamed(metrics: Dict[str, float], prefixes: Dict[str, str]) -> Dict[str, float]:
    out = {}
    for k, v in metrics.items():
        for old, new in prefixes.items():
            if k.startswith(old):
                out[new + k[len(old):]] = v
    return out


def baseline_rows(args: argparse.Namespace, jobs: List[Job]) -> List[Dict[str, Any]]:
    """Raw pixels (the evaluators' json files) and the random-init encoder (merged into the reference run's
    summary under knn_random_init/, linear_random_init/), under the same metric names as the runs."""
    pix = Path(args.out) / "baselines" / "pixels"
    metrics: Dict[str, float] = {}
    for name in ("knn.json", "linear.json"):
        if (pix / name).is_file():
            metrics.update(json.loads((pix / name).read_text())["metrics"])
    rows = [{"run": "raw pixels", **metrics}]
    ref = reference_job(jobs)
    if ref is not None and (ref.run_dir / "summary.json").is_file():
        final = load_run_dir(ref.run_dir).final
        rows.append({"run": "random-init encoder",
                     **_renamed(final, {"knn_random_init/": "knn/", "linear_random_init/": "linear/"})})
    return rows


def aggregate(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows of the same setting merged: {"run", "seeds", "mean": {figure: value}, "std": {figure: sample std}}
    over the evaluated seeds (std None for one seed)."""
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == name and knn_columns([r])]  # a seed still training does not count
        agg: Dict[str, Any] = {"run": name, "seeds": [r["seed"] for r in group], "mean": {}, "std": {}}
        for key in [*knn_columns(group), *FIGURES, "tau", *TAU_STATS, "pretrain_min"]:
            vals = [r[key] for r in group if r.get(key) is not None]
            agg["mean"][key] = statistics.fmean(vals) if vals else None
            agg["std"][key] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(agg)
    return out


def _fmt(v: Optional[float], std: Optional[float] = None, digits: int = 2, scale: float = 1.0) -> str:
    if v is None:
        return "–"
    s = f"{scale * v:.{digits}f}"
    return s + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def markdown_table(agg: List[Dict[str, Any]], baselines: List[Dict[str, Any]]) -> str:
    keys = knn_columns([a["mean"] for a in agg])
    cols = ["run", "seeds", *[knn_label(k) for k in keys], "linear", "ECE before → after (%)", "align", "uniform",
            "final τ", "pretrain min"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for a in agg:
        m, sd = a["mean"], a["std"]
        cells = [a["run"], ",".join(map(str, a["seeds"])), *[_fmt(m.get(k), sd.get(k)) for k in keys],
                 _fmt(m["linear/test_top1"], sd["linear/test_top1"]),
                 f"{_fmt(m['calib/ece_before'], None, 2, 100)} → {_fmt(m['calib/ece_after'], None, 2, 100)}",
                 _fmt(m["diag/alignment"], None, 3), _fmt(m["diag/uniformity"], None, 3), _fmt(m["tau"], sd["tau"], 4),
                 _fmt(m["pretrain_min"], None, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    blank = [""] * 5
    for b in baselines:
        lines.append("| " + " | ".join([f"*{b['run']}*", "–", *[_fmt(b.get(k)) for k in keys],
                                        _fmt(b.get("linear/test_top1")), *blank]) + " |")
    for name, acc in PAPER_BASELINES.items():
        lines.append("| " + " | ".join([f"*paper: {name}*", "–", *[""] * len(keys), f"{acc:.1f} (classifier)", *blank])
                     + " |")
    return "\n".join(lines)


def verdict(agg: List[Dict[str, Any]], baselines: List[Dict[str, Any]]) -> List[str]:
    """The goals of the study, checked on the figures (printed and written to results.md)."""
    out: List[str] = []
    keys = knn_columns([a["mean"] for a in agg])
    ssl = [a for a in agg if keys and a["mean"].get(keys[0]) is not None]
    if not ssl:
        return ["no finished run"]
    base = {b["run"]: b for b in baselines}
    for key in keys:
        for bname in ("random-init encoder", "raw pixels"):
            ref = base.get(bname, {}).get(key)
            if ref is None:
                continue
            miss = [a["run"] for a in ssl if a["mean"].get(key) is not None and a["mean"][key] <= ref]
            out.append(f"{knn_label(key)}: {len(ssl) - len(miss)}/{len(ssl)} runs beat the {bname} ({ref:.2f})"
                       + (f"; not: {', '.join(miss)}" if miss else ""))
    for key, label in (("linear/test_top1", "linear probe"), *[(k, knn_label(k)) for k in keys[:1]]):
        ranked = sorted((a for a in ssl if a["mean"].get(key) is not None), key=lambda a: -a["mean"][key])
        if len(ranked) >= 2:
            best, second = ranked[0], ranked[1]
            gap = best["mean"][key] - second["mean"][key]
            spreads = [a["std"][key] for a in ssl if a["std"].get(key) is not None]
            noise = (f"; largest seed std among multi-seed rows {max(spreads):.2f}, so the gap is "
                     f"{'larger' if gap > max(spreads) else 'not larger'} than seed noise") if spreads else \
                "; one seed per run, no spread measured"
            out.append(f"best {label}: {best['run']} {best['mean'][key]:.2f}, ahead of {second['run']} by "
                       f"{gap:.2f}{noise}")
    best_lin = max((a["mean"]["linear/test_top1"] for a in ssl if a["mean"]["linear/test_top1"] is not None),
                   default=None)
    if best_lin is not None:
        svc = PAPER_BASELINES["SVC (rbf, C=10)"]
        out.append(f"best linear probe {best_lin:.2f} vs the paper's best classical baseline (SVC) {svc}: "
                   f"{'above' if best_lin > svc else 'below'}")
    return out


def t975(df: int) -> float:
    """Student's t two-sided 95 % quantile for ``df`` degrees of freedom (the next tabulated df below)."""
    return T975[max(d for d in T975 if d <= df)] if df < 30 else 1.96 + 2.4 / df


def paired_differences(rows: List[Dict[str, Any]], keys: Sequence[str], reference: str = REFERENCE
                       ) -> List[Dict[str, Any]]:
    """Each setting minus ``reference`` on the seeds both ran (same seed = same data order, augmentations and
    initialization): mean difference, sample std, 95 % t-interval, verdict (better / worse when the interval
    excludes 0, else no evidence), per metric."""
    ref = {r["seed"]: r for r in rows if r["run"] == reference and knn_columns([r])}
    out = []
    for name in dict.fromkeys(r["run"] for r in rows if r["run"] != reference):
        mine = {r["seed"]: r for r in rows if r["run"] == name and knn_columns([r])}
        seeds = sorted(set(mine) & set(ref))
        for key in keys:
            d = [mine[s][key] - ref[s][key] for s in seeds if mine[s].get(key) is not None and ref[s].get(key) is not None]
            entry = {"run": name, "metric": key, "seeds": seeds, "n": len(d), "mean": statistics.fmean(d) if d else None}
            if len(d) >= 2:
                sd = statistics.stdev(d)
                half = t975(len(d) - 1) * sd / len(d) ** 0.5
                lo, hi = entry["mean"] - half, entry["mean"] + half
                entry.update(std=sd, lo=lo, hi=hi, verdict="better" if lo > 0 else "worse" if hi < 0 else "no evidence")
            else:
                entry.update(std=None, lo=None, hi=None, verdict="one seed: no interval")
            out.append(entry)
    return out


def paired_table(diffs: List[Dict[str, Any]], keys: Sequence[str]) -> str:
    if not diffs:
        return ""
    head = ["run", "seeds", *[f"Δ {knn_label(k) if k.startswith('knn/') else 'linear'}" for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in dict.fromkeys(d["run"] for d in diffs):
        cells = [name]
        ds = {d["metric"]: d for d in diffs if d["run"] == name}
        cells.append(",".join(map(str, next(iter(ds.values()))["seeds"])))
        for k in keys:
            d = ds.get(k)
            if d is None or d["mean"] is None:
                cells.append("–")
            elif d["lo"] is None:
                cells.append(f"{d['mean']:+.2f} ({d['verdict']})")
            else:
                cells.append(f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] {d['verdict']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tau_table(agg: List[Dict[str, Any]]) -> str:
    """τ statistics of the runs whose τ has state (dro per-sample: quantiles of all τ_i and the bounds)."""
    rows = [a for a in agg if a["mean"].get("tau_p50") is not None or a["mean"].get("tau_at_min") is not None]
    if not rows:
        return ""
    lines = ["| run | final τ (scalar or batch mean) | τ_i p1 / p50 / p99 | fraction of τ at τ_min / τ_max |", "|---|---|---|---|"]
    for a in rows:
        m = a["mean"]
        q = " / ".join(_fmt(m.get(k), None, 3) for k in ("tau_p1", "tau_p50", "tau_p99")) if m.get("tau_p50") is not None else "–"
        lines.append(f"| {a['run']} | {_fmt(m['tau'], a['std'].get('tau'), 4)} | {q} | "
                     f"{_fmt(m.get('tau_at_min'), None, 3)} / {_fmt(m.get('tau_at_max'), None, 3)} |")
    return "\n".join(lines)


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def write_results(args: argparse.Namespace, jobs: List[Job], wall_s: float, wall_what: str = "wall time of this invocation"
                  ) -> str:
    seconds = step_seconds(Path(args.out))
    rows = [run_row(j, seconds) for j in jobs]
    agg, base = aggregate(rows), ([] if args.no_baselines else baseline_rows(args, jobs))
    notes = verdict(agg, base)
    keys = [*knn_columns(rows), "linear/test_top1"]
    diffs = paired_differences(rows, keys)
    cmd = shlex.join([Path(sys.executable).name, *sys.argv])
    md = "\n".join([
        f"# Fashion-MNIST τ study ({args.preset} preset)", "",
        f"Command: `{cmd}`  ", f"Machine: {machine()}  ", f"Time: {wall_s / 60:.1f} min ({wall_what})", "",
        "Test-set top-1 (%) on the 10k Fashion-MNIST test images; mean ± sample std over seeds where several ran.", "",
        markdown_table(agg, base), "", *[f"- {n}" for n in notes], "",
        *([f"Paired differences to {REFERENCE} (same seeds), mean [95 % t-interval] and verdict:", "",
           paired_table(diffs, keys), ""] if diffs else []),
        *(["τ statistics at the end of training (mean over seeds):", "", tau_table(agg), ""] if tau_table(agg) else []),
        "Plots: `compare/` (kNN vs epoch, loss and τ vs step, final metrics), `compare/report.html`.", ""])
    out = Path(args.out)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"rows": rows, "aggregate": agg, "baselines": base, "verdict": notes,
                                                  "paired": diffs,
                                                  "machine": machine(), "wall_s": wall_s, "command": cmd}, indent=2))
    return md


def subprocess_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``python -m simclr_tau`` imports this checkout even when it is not installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **(extra or {})}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    preset = PRESETS[args.preset]
    jobs_n = args.jobs or preset["jobs"]
    jobs = plan(args)
    pixel_steps, random_steps = ([], []) if args.no_baselines else baseline_steps(args, jobs)
    logs = Path(args.out) / "logs"
    if args.dry_run:
        for step in [s for j in jobs for s in j.steps] + pixel_steps + random_steps + [compare_step(args, jobs)]:
            print(shlex.join(step.cmd))
        return 0
    t0 = time.time()
    if args.report_only:
        finished = [j for j in jobs if (j.run_dir / "encoder.safetensors").is_file()]
        ok = run_steps("compare", [compare_step(args, finished)], logs, subprocess_env()) if finished else True
        wall = sum(step_seconds(Path(args.out)).values())  # a rebuilt report has no wall clock of its own
        print("\n" + write_results(args, jobs, wall, "sum of the recorded step times; steps ran --jobs at a time"),
              flush=True)
        return 0 if ok else 1
    threads = max(1, (os.cpu_count() or 1) // jobs_n)
    env = subprocess_env({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
                          "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", f"fmnist-study-{args.preset}")})
    print(f"{len(jobs)} runs, {jobs_n} at a time ({env['OMP_NUM_THREADS']} threads each); logs in {logs}", flush=True)
    with ThreadPoolExecutor(jobs_n) as pool:
        futures = [pool.submit(run_steps, j.label, j.steps, logs, env) for j in jobs]
        if pixel_steps:  # one more pipeline in the pool
            futures.append(pool.submit(run_steps, "baselines", pixel_steps, logs, env))
        ok = [f.result() for f in futures]
    if random_steps:  # after the pool: they need the reference run's directory
        ok.append(run_steps("baselines", random_steps, logs, env))
    finished = [j for j in jobs if (j.run_dir / "encoder.safetensors").is_file()]
    if finished:
        ok.append(run_steps("compare", [compare_step(args, finished)], logs, env))
    md = write_results(args, jobs, time.time() - t0)
    print("\n" + md, flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
