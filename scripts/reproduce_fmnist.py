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

PRESETS: Dict[str, Dict[str, Any]] = {
    # backbone / epochs / batch live in the configs; the comments there say why
    "cpu": {"simclr": "configs/fmnist_study_cpu.yaml", "mocov2": "configs/fmnist_study_mocov2_cpu.yaml",
            "seeds": [0], "spread_seeds": [1], "jobs": 2},
    "gpu": {"simclr": "configs/fmnist_simclr_gpu.yaml", "mocov2": "configs/fmnist_mocov2_gpu.yaml",
            "seeds": [0, 1, 2], "spread_seeds": [], "jobs": 1},
}

LEARNABLE = ["temperature.mode=learnable", "temperature.init=0.2"]
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
    "mocov2-fixed-0.2": {"method": "mocov2", "overrides": ["temperature.mode=fixed", "temperature.init=0.2"]},
    "mocov2-learnable-log": {"method": "mocov2", "overrides": LEARNABLE + ["temperature.parametrization=log"]},
}
SPREAD_RUNS = ["simclr-fixed-0.2", "simclr-learnable-log"]

# Xiao, Rasul & Vollgraf 2017, "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
# Algorithms" (arXiv:1708.07747), Table 3 / the repository's benchmark: best test accuracy per classifier.
PAPER_BASELINES = {"SVC (rbf, C=10)": 89.7, "KNeighbors (k=5, L1, distance)": 85.4, "LogisticRegression (C=1, L1)": 84.2}



def knn_results(path: Path) -> Dict[str, float]:
    """{"k20_t0.07": top-1, ...} from a knn.json (the protocols its run evaluated, in order)."""
    return {f"k{r['k']}_t{r['T']:g}": r["top1"] for r in _read(path).get("results", [])}


@dataclass
class Job:
    name: str  # RUNS key
    seed: int
    run_dir: Path
    commands: List[List[str]] = field(default_factory=list)


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
    """One Job per (setting, seed) with its pretrain / knn / linear commands."""
    preset = PRESETS[args.preset]
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    spread = args.spread_seeds if args.spread_seeds is not None else preset["spread_seeds"]
    out = Path(args.out)
    jobs = []
    for name in args.only or list(RUNS):
        spec = RUNS[name]
        run_seeds = list(seeds) + [s for s in spread if name in args.spread_runs and s not in seeds]
        for seed in run_seeds:
            run_name = f"{name}-s{seed}"
            run_dir = out / run_name
            config = str(REPO / preset[spec["method"]])
            pre = python_cmd("pretrain", config, *spec["overrides"], *args.overrides, f"train.seed={seed}",
                             f"train.output_dir={out}", f"train.run_name={run_name}", "train.progress=false")
            if run_dir.is_dir() and not (run_dir / "encoder.safetensors").is_file():
                pre += ["--resume", "auto"]  # an interrupted run continues from its last checkpoint
            jobs.append(Job(name, seed, run_dir, [
                pre,
                python_cmd("knn", str(run_dir), "--no-progress"),
                python_cmd("linear", str(run_dir), "--no-progress"),
            ]))
    return jobs


def baseline_commands(args: argparse.Namespace, jobs: List[Job]) -> List[List[str]]:
    """Raw pixels and the random-init encoder (same architecture as the first SimCLR run), kNN + linear."""
    config = str(REPO / PRESETS[args.preset]["simclr"])
    pix = str(Path(args.out) / "baselines" / "pixels")
    cmds = [python_cmd("knn", "pixels", "--config", config, "--out", pix, "--no-progress", *args.overrides),
            python_cmd("linear", "pixels", "--config", config, "--out", pix, "--no-progress", *args.overrides)]
    ref = next((j for j in jobs if RUNS[j.name]["method"] == "simclr"), None)
    if ref is not None:  # written next to that run's own results: eval/knn_random_init.json, linear_random_init.json
        cmds += [python_cmd("knn", str(ref.run_dir), "--random-init", "--no-progress"),
                 python_cmd("linear", str(ref.run_dir), "--random-init", "--no-progress")]
    return cmds


def compare_command(args: argparse.Namespace, jobs: List[Job]) -> List[str]:
    return python_cmd("compare", *[str(j.run_dir) for j in jobs], "--out", str(Path(args.out) / "compare"),
                      "--metric", "diag/alignment", "--metric", "diag/uniformity")


def done(cmd: List[str]) -> bool:
    """Whether a step's output already exists (restartable study)."""
    sub, target = cmd[3], Path(cmd[4])
    if sub == "compare":
        return False  # cheap, and its inputs may have changed
    if sub == "pretrain":
        run_dir = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("train.output_dir="))) / next(
            a.split("=", 1)[1] for a in cmd if a.startswith("train.run_name="))
        return (run_dir / "encoder.safetensors").is_file()
    suffix = "_random_init" if "--random-init" in cmd else ""
    out = Path(cmd[cmd.index("--out") + 1]) if "--out" in cmd else target / "eval"
    return (out / f"{sub}{suffix}.json").is_file()


def run_steps(label: str, cmds: List[List[str]], log_dir: Path, env: Dict[str, str]) -> bool:
    """Run ``cmds`` in order (skipping finished ones), appending to ``log_dir/<label>.log``. True if all passed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{label}.log", "a") as log:
        for c in cmds:
            if done(c):
                continue
            t0 = time.time()
            log.write(f"\n$ {shlex.join(c)}\n")
            log.flush()
            rc = subprocess.call(c, env=env, stdout=log, stderr=subprocess.STDOUT)
            status = "ok" if rc == 0 else f"FAILED (exit {rc})"
            seconds = time.time() - t0
            print(f"[{time.strftime('%H:%M:%S')}] {label}: {c[3]} {status} in {seconds:.0f} s", flush=True)
            with open(log_dir / "timings.jsonl", "a") as f:  # one line per step: the table's wall times
                f.write(json.dumps({"label": label, "step": c[3], "seconds": round(seconds, 1), "rc": rc}) + "\n")
            if rc != 0:
                return False
    return True


# ---- the table -----------------------------------------------------------------------------------------

def _read(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def step_seconds(out: Path) -> Dict[Tuple[str, str], float]:
    """{(label, step): seconds} of the last successful execution of each step (logs/timings.jsonl)."""
    path = out / "logs" / "timings.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {(r["label"], r["step"]): r["seconds"] for r in rows if r["rc"] == 0}


def _minutes(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds / 60


def run_row(job: Job, seconds: Optional[Dict[Tuple[str, str], float]] = None) -> Dict[str, Any]:
    """The figures of one finished run (missing ones are None)."""
    s = _read(job.run_dir / "summary.json")
    ev = job.run_dir / "eval"
    lin = _read(ev / "linear.json").get("metrics", {})
    taus = [json.loads(line) for line in (job.run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (job.run_dir / "metrics.jsonl").is_file() else []
    tau_final = next((m.get("train/tau", m.get("train/tau_mean")) for m in reversed(taus)
                      if "train/tau" in m or "train/tau_mean" in m), None)
    return {
        "run": job.name, "seed": job.seed, "run_dir": str(job.run_dir),
        **{f"knn_{k}": v for k, v in knn_results(ev / "knn.json").items()}, "linear": lin.get("linear/test_top1"), "ece_before": lin.get("calib/ece_before"),
        "ece_after": lin.get("calib/ece_after"), "alignment": s.get("diag/alignment"),
        "uniformity": s.get("diag/uniformity"), "tau_final": tau_final,
        "images_per_s": next((m["train/images_per_s"] for m in reversed(taus) if "train/images_per_s" in m), None),
        "pretrain_min": _minutes((seconds or {}).get((f"{job.name}-s{job.seed}", "pretrain"))),
    }


def baseline_rows(args: argparse.Namespace, jobs: List[Job]) -> List[Dict[str, Any]]:
    pix = Path(args.out) / "baselines" / "pixels"
    rows = [{"run": "raw pixels", **{f"knn_{k}": v for k, v in knn_results(pix / "knn.json").items()},
             "linear": _read(pix / "linear.json").get("metrics", {}).get("linear/test_top1")}]
    ref = next((j for j in jobs if RUNS[j.name]["method"] == "simclr"), None)
    if ref is not None:
        ev = ref.run_dir / "eval"
        rows.append({"run": "random-init encoder",
                     **{f"knn_{k}": v for k, v in knn_results(ev / "knn_random_init.json").items()},
                     "linear": _read(ev / "linear_random_init.json").get("metrics", {}).get("linear_random_init/test_top1")})
    return rows


FIGURES = ("linear", "ece_before", "ece_after", "alignment", "uniformity", "tau_final", "images_per_s", "pretrain_min")


def knn_keys(rows: List[Dict[str, Any]]) -> List[str]:
    """The kNN columns present in ``rows`` ("knn_k20_t0.07", ...), in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith("knn_") and not k.endswith("_std")))


def aggregate(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows of the same setting merged: mean, sample std and n per figure (std None for one seed)."""
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        group = [r for r in rows if r["run"] == name]
        evaluated = [r for r in group if knn_keys([r])]
        group = evaluated or group[:1]  # a seed still training does not count (nor show) yet
        agg: Dict[str, Any] = {"run": name, "seeds": [r["seed"] for r in evaluated]}
        for key in [*knn_keys(group), *FIGURES]:
            vals = [r[key] for r in group if r.get(key) is not None]
            agg[key] = statistics.fmean(vals) if vals else None
            agg[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(agg)
    return out


def _fmt(v: Optional[float], std: Optional[float] = None, digits: int = 2, scale: float = 1.0) -> str:
    if v is None:
        return "–"
    s = f"{scale * v:.{digits}f}"
    return s + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def _knn_label(key: str) -> str:
    k, t = key[len("knn_"):].split("_t")
    return f"kNN k={k[1:]} T={t}"


def markdown_table(agg: List[Dict[str, Any]], baselines: List[Dict[str, Any]]) -> str:
    keys = knn_keys(agg)
    cols = ["run", "seeds", *[_knn_label(k) for k in keys], "linear", "ECE before → after (%)", "align", "uniform",
            "final τ", "pretrain min"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for a in agg:
        cells = [a["run"], ",".join(map(str, a["seeds"])), *[_fmt(a.get(k), a.get(k + "_std")) for k in keys],
                 _fmt(a["linear"], a["linear_std"]),
                 f"{_fmt(a['ece_before'], None, 2, 100)} → {_fmt(a['ece_after'], None, 2, 100)}",
                 _fmt(a["alignment"], None, 3), _fmt(a["uniformity"], None, 3), _fmt(a["tau_final"], a["tau_final_std"], 4),
                 _fmt(a["pretrain_min"], None, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    blank = [""] * 5
    for b in baselines:
        lines.append("| " + " | ".join([f"*{b['run']}*", "–", *[_fmt(b.get(k)) for k in keys], _fmt(b.get("linear")),
                                        *blank]) + " |")
    for name, acc in PAPER_BASELINES.items():
        lines.append("| " + " | ".join([f"*paper: {name}*", "–", *[""] * len(keys), f"{acc:.1f} (classifier)", *blank])
                     + " |")
    return "\n".join(lines)


def verdict(agg: List[Dict[str, Any]], baselines: List[Dict[str, Any]]) -> List[str]:
    """The goals of the study, checked on the figures (printed and written to results.md)."""
    out: List[str] = []
    keys = knn_keys(agg)
    ssl = [a for a in agg if keys and a.get(keys[0]) is not None]
    if not ssl:
        return ["no finished run"]
    base = {b["run"]: b for b in baselines}
    for key in keys:
        for bname in ("random-init encoder", "raw pixels"):
            ref = base.get(bname, {}).get(key)
            if ref is None:
                continue
            miss = [a["run"] for a in ssl if a.get(key) is not None and a[key] <= ref]
            out.append(f"{_knn_label(key)}: {len(ssl) - len(miss)}/{len(ssl)} runs beat the {bname} ({ref:.2f})"
                       + (f"; not: {', '.join(miss)}" if miss else ""))
    for key, label in (("linear", "linear probe"), *[(k, _knn_label(k)) for k in keys[:1]]):
        ranked = sorted((a for a in ssl if a.get(key) is not None), key=lambda a: -a[key])
        if len(ranked) >= 2:
            best, second = ranked[0], ranked[1]
            gap = best[key] - second[key]
            spreads = [a[key + "_std"] for a in ssl if a.get(key + "_std") is not None]
            noise = (f"; largest seed std among multi-seed rows {max(spreads):.2f}, so the gap is "
                     f"{'larger' if gap > max(spreads) else 'not larger'} than seed noise") if spreads else \
                "; one seed per run, no spread measured"
            out.append(f"best {label}: {best['run']} {best[key]:.2f}, ahead of {second['run']} by {gap:.2f}{noise}")
    best_lin = max((a["linear"] for a in ssl if a["linear"] is not None), default=None)
    if best_lin is not None:
        svc = PAPER_BASELINES["SVC (rbf, C=10)"]
        out.append(f"best linear probe {best_lin:.2f} vs the paper's best classical baseline (SVC) {svc}: "
                   f"{'above' if best_lin > svc else 'below'}")
    return out


def wall_from_timings(out: Path) -> float:
    """Sum of the recorded step times (a report rebuilt later has no wall clock of its own)."""
    return sum(step_seconds(out).values())


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
    cmd = shlex.join([Path(sys.executable).name, *sys.argv])
    md = "\n".join([
        f"# Fashion-MNIST τ study ({args.preset} preset)", "",
        f"Command: `{cmd}`  ", f"Machine: {machine()}  ", f"Time: {wall_s / 60:.1f} min ({wall_what})", "",
        "Test-set top-1 (%) on the 10k Fashion-MNIST test images; mean ± sample std over seeds where several ran.", "",
        markdown_table(agg, base), "", *[f"- {n}" for n in notes], "",
        "Plots: `compare/` (kNN vs epoch, loss and τ vs step, final metrics), `compare/report.html`.", ""])
    out = Path(args.out)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"rows": rows, "aggregate": agg, "baselines": base, "verdict": notes,
                                                  "machine": machine(), "wall_s": wall_s, "command": cmd}, indent=2))
    return md


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    preset = PRESETS[args.preset]
    jobs_n = args.jobs or preset["jobs"]
    jobs = plan(args)
    base_cmds = [] if args.no_baselines else baseline_commands(args, jobs)
    compare = compare_command(args, jobs)
    if args.dry_run:
        for j in jobs:
            for c in j.commands:
                print(shlex.join(c))
        for c in base_cmds + [compare]:
            print(shlex.join(c))
        return 0
    t0 = time.time()
    if args.report_only:
        finished = [j for j in jobs if (j.run_dir / "encoder.safetensors").is_file()]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        ok = run_steps("compare", [compare_command(args, finished)], Path(args.out) / "logs", env) if finished else True
        print("\n" + write_results(args, jobs, wall_from_timings(Path(args.out)),
                                   "sum of the recorded step times; steps ran --jobs at a time"), flush=True)
        return 0 if ok else 1
    threads = max(1, (os.cpu_count() or 1) // jobs_n)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
           "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", f"fmnist-study-{args.preset}")}
    logs = Path(args.out) / "logs"
    print(f"{len(jobs)} runs, {jobs_n} at a time ({env['OMP_NUM_THREADS']} threads each); logs in {logs}", flush=True)
    with ThreadPoolExecutor(jobs_n) as pool:
        futures = [pool.submit(run_steps, f"{j.name}-s{j.seed}", j.commands, logs, env) for j in jobs]
        if base_cmds:  # baselines are one more pipeline in the pool
            futures.append(pool.submit(run_steps, "baselines", base_cmds[:2], logs, env))
        ok = [f.result() for f in futures]
    if base_cmds[2:]:  # random init needs its reference run's directory
        ok.append(run_steps("baselines", base_cmds[2:], logs, env))
    finished = [j for j in jobs if (j.run_dir / "encoder.safetensors").is_file()]
    if finished:
        ok.append(run_steps("compare", [compare_command(args, finished)], logs, env))
    md = write_results(args, jobs, time.time() - t0)
    print("\n" + md, flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
