#!/usr/bin/env python
"""The τ study on Fashion-MNIST: pretrain every τ mode, evaluate each, tabulate, compare.

    python scripts/reproduce_fmnist.py --preset cpu                 # round one, 2-core CPU: ~1.5 h (2 at a time)
    python scripts/reproduce_fmnist.py --preset gpu --jobs 1        # one GPU, ResNet-18, 100 epochs per run
    python scripts/reproduce_fmnist.py --preset cpu2                # round two (issue 17): SETTINGS_ROUND2, seeds
                                                                    # 0-2 (+3, 4 for fixed 0.2), the OOD block
    python scripts/reproduce_fmnist.py --preset cpu2 --best-learned simclr-conditional \
        --second-learned simclr-dro-per-sample                      # ... then DCL / MoCo v2 with the best learned
                                                                    # mode, 5 seeds for the best two
    python scripts/reproduce_fmnist.py --preset cpu2-long           # 24 epochs: the recipe row vs the bounded
                                                                    # learned τ on its head, seeds 0-2: 6 runs of
                                                                    # 38-74 min (machine-dependent), 2 at a time
    python scripts/reproduce_fmnist.py --preset cpu --dry-run       # print every command, run nothing
    python scripts/reproduce_fmnist.py --preset cpu --only simclr-fixed-0.2 train.epochs=1   # a subset, overridden

Runs (one backbone, budget and seed set per preset; the preset's two configs hold everything else):

    simclr-fixed-{0.05,0.07,0.1,0.2,0.5}   fixed τ
    simclr-learnable-{log,softplus,relu}   learnable scalar τ, init 0.2, each parametrization, unbounded
    simclr-learnable-log-bounded    learnable τ = exp θ, init 0.2, projected into [0.05, 1] after each step
    simclr-conditional              per-sample τ from an MLP on the (detached) projection, init 0.2, in [0.05, 1]
    simclr-cosine                   scheduled τ: cosine from 0.5 down to 0.1 over the run
    simclr-dro-{global,per-sample,per-sample-sogclr}   τ by the robust (iSogCLR) objective, init 0.2 in [0.05, 0.7]
    simclr-dro-*-rho1               the same with ρ = 1 (and η = 0.05 for per-sample τ)
    simclr-conditional-dro          TempNet-style τ head trained by the robust objective
    simclr-adaptive                 MACL's alignment-following τ, τ_0 = 0.2
    simclr-dcl-fixed-0.2            decoupled NT-Xent (DCL), fixed τ 0.2
    mocov2-fixed-0.2, mocov2-learnable-log, mocov2-learnable-log-bounded
    simclr-fixed-0.2-outbn          a recipe row: fixed 0.2 with an affine output BatchNorm in the projection head
    simclr-learnable-log-bounded-outbn   the bounded learnable τ on that head
    simclr-dcl-<mode>, mocov2-<mode>   derived from ``--best-learned simclr-<mode>``: its overrides with
                                    loss.decoupled=true (not for a dro objective, decoupled already) / MoCo v2

Presets cpu and gpu run the round-one list (SETTINGS_ROUND1); cpu2-long runs SETTINGS_LONG with cpu2's configs for
24 epochs and pairs every setting against its recipe row, simclr-fixed-0.2-outbn (a preset's ``reference``;
the others': simclr-fixed-0.2); cpu2 runs SETTINGS_ROUND2 and, unless
``--no-ood``, the OOD block: OOD_SETTINGS pretrained on ``data.classes`` (OOD_CLASSES; the other two classes held
out) into ``ood-<setting>-s<seed>/``, each scored by ``simclr-tau ood`` (eval/ood.json: AUROC of τ_i and of the
kNN distance for the held-out classes and for kNN errors). ``--only`` with no name leaves the OOD block alone.

Every run is pretrained with ``python -m simclr_tau pretrain`` and evaluated with ``simclr-tau knn`` (FAISS,
k=20/T=0.07 and k=200/T=0.1, plus alignment/uniformity of test views) and ``simclr-tau linear`` (L-BFGS
softmax probe on cached features, weight decay chosen on a validation split of the training set; ECE before
and after temperature scaling). Baselines, evaluated by the same code: raw pixels (kNN, linear probe) and
the random-init encoder (kNN, linear probe); the Fashion-MNIST paper's classical results are quoted.

Seeds: ``--seeds`` for every run, and ``--spread-seeds`` for the ``--spread-runs`` only (the spread a table
needs to say whether a difference between τ modes is larger than seed noise; default: the preset's, plus
``--best-learned`` and ``--second-learned``). The same seeds across settings make the differences paired.
``--jobs N`` runs N pipelines at once (CPU: each gets cores/N threads, which on small models beats one job
with all cores); they start seed by seed (every setting's seed 0 first), so an interrupted study already
holds paired comparisons.

The script is restartable: a finished step (encoder exported, knn.json, linear.json) is skipped, and an
interrupted pretraining resumes from its last checkpoint. ``--archive DIR`` keeps the study past its machine:
every finished run's small files (configs, metrics, evaluations, log; no weights) are mirrored into DIR, a
folder to commit, and restored from it into a study directory that lacks them, so that a fresh clone continues
the study where it stood and ``--report-only --archive DIR`` rebuilds its tables and plots (scripts/study_archive.py;
with ``--report-only`` it also archives the runs finished meanwhile, e.g. by a study running beside it). Outputs under ``--out`` (default runs/fmnist-study,
cpu2: runs/fmnist-study2): ``<run>-s<seed>/`` run directories, ``logs/`` (with ``timings.jsonl``: the seconds
of every step), ``baselines/``, ``compare/`` (plots, report.html), ``plots/`` (one line or band per setting:
kNN vs epoch over the seeds, τ vs step, the paired differences; scripts/study_plots.py), ``results.md`` and
``results.json``.
results.md, over every evaluated run in the study directory whichever invocation ran it: the table, the verdict
per mode against fixed 0.2 (paired 95 % t-intervals), the setting RankMe would have picked and where it ranks,
the learned modes ranked (for ``--best-learned``), τ statistics, and the OOD table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))  # study_tables, tau_sweep (also when loaded by path)

from simclr_tau.records.run_data import final_tau, load_run_dir  # noqa: E402
from study_archive import archive, restore  # noqa: E402
from study_plots import load_study_runs, write_study_plots  # noqa: E402
from study_tables import (FIGURES, LINEAR, RANKME, REFERENCE, TAU_STATS, aggregate, knn_columns,  # noqa: E402
                          learned_ranking_line, markdown_table, mode_verdicts, ood_aggregate, ood_record, ood_table,
                          paired_differences, paired_table, primary_knn, rankme_line, summary_table, tau_table,
                          verdict, vs_best_fixed, vs_best_fixed_table, vs_references, vs_references_table)

LEARNABLE = ["temperature.mode=learnable", "temperature.init=0.2"]
BOUNDED = LEARNABLE + ["temperature.parametrization=log", "temperature.tau_min=0.05", "temperature.tau_max=1.0"]
OUT_BN = ["model.proj_out_bn=affine"]  # lightly's affine output BatchNorm in the projection head
DRO = ["temperature.mode=dro", "temperature.init=0.2"]
RUNS: Dict[str, Dict[str, Any]] = {
    # 0.05: where the bounded learnable τ ends (its floor), the constant a learned τ must beat to count as learned
    "simclr-fixed-0.05": {"method": "simclr", "overrides": ["temperature.mode=fixed", "temperature.init=0.05"]},
    "simclr-fixed-0.07": {"method": "simclr", "overrides": ["temperature.mode=fixed", "temperature.init=0.07"]},
    "simclr-fixed-0.1": {"method": "simclr", "overrides": ["temperature.mode=fixed", "temperature.init=0.1"]},
    "simclr-fixed-0.2": {"method": "simclr", "overrides": ["temperature.mode=fixed", "temperature.init=0.2"]},
    "simclr-fixed-0.5": {"method": "simclr", "overrides": ["temperature.mode=fixed", "temperature.init=0.5"]},
    "simclr-learnable-log": {"method": "simclr", "overrides": LEARNABLE + ["temperature.parametrization=log"]},
    "simclr-learnable-softplus": {"method": "simclr", "overrides": LEARNABLE + ["temperature.parametrization=softplus"]},
    "simclr-learnable-relu": {"method": "simclr", "overrides": LEARNABLE + ["temperature.parametrization=relu"]},
    # the unbounded learnable τ falls to ~0.01 within an epoch (round one); the conditional τ's bounds
    "simclr-learnable-log-bounded": {"method": "simclr", "overrides": BOUNDED},
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
    # a recipe row, not a τ mode: fixed 0.2 with lightly's affine output BatchNorm in the projection head, which
    # the main job took up after round two had started (issue 20: +0.37 kNN k=20 over epochs 1-6, one seed);
    # paired with fixed 0.2 it measures that head change with the study's seeds
    "simclr-fixed-0.2-outbn": {"method": "simclr", "overrides": ["temperature.mode=fixed", "temperature.init=0.2",
                                                                 *OUT_BN]},
    "mocov2-learnable-log": {"method": "mocov2", "overrides": LEARNABLE + ["temperature.parametrization=log"]},
    # round two's derived MoCo v2 run of the best learned mode (--best-learned simclr-learnable-log-bounded), named
    # so that --only can run it alone (the 24-epoch runs of the settings below raw pixels at 6 epochs)
    "mocov2-learnable-log-bounded": {"method": "mocov2", "overrides": BOUNDED},
    # the bounded learnable τ (round two's best kNN mode) on the recipe row's head: the 24-epoch comparison
    # (preset cpu2-long) pairs it with simclr-fixed-0.2-outbn, so that only τ differs between the two
    "simclr-learnable-log-bounded-outbn": {"method": "simclr", "overrides": BOUNDED + OUT_BN},
}
SPREAD_RUNS = ["simclr-fixed-0.2", "simclr-learnable-log"]

# round one (presets cpu and gpu; the DRO study ran a part of it with --only): every setting of that time
SETTINGS_ROUND1 = [
    "simclr-fixed-0.07", "simclr-fixed-0.2", "simclr-fixed-0.5", "simclr-learnable-log", "simclr-learnable-softplus",
    "simclr-learnable-relu", "simclr-conditional", "simclr-cosine", "simclr-dro-global", "simclr-dro-per-sample",
    "simclr-dro-per-sample-sogclr", "simclr-dro-global-rho1", "simclr-dro-per-sample-rho1",
    "simclr-dro-per-sample-sogclr-rho1", "simclr-conditional-dro", "simclr-adaptive", "simclr-dcl-fixed-0.2",
    "mocov2-fixed-0.2", "mocov2-learnable-log"]
# round two (issue 17), preset cpu2; --best-learned adds its DCL and MoCo v2 variants (derived_runs)
SETTINGS_ROUND2 = [
    "simclr-fixed-0.05", "simclr-fixed-0.1", "simclr-fixed-0.2", "simclr-fixed-0.5", "simclr-learnable-log", "simclr-learnable-log-bounded",
    "simclr-dro-global", "simclr-dro-per-sample", "simclr-dro-per-sample-sogclr", "simclr-conditional",
    "simclr-conditional-dro", "simclr-adaptive", "simclr-cosine", "simclr-dcl-fixed-0.2", "mocov2-fixed-0.2",
    "simclr-fixed-0.2-outbn"]
# the 24-epoch comparison (preset cpu2-long): the recipe row and the bounded learned τ on the same head, so that
# only τ differs; round two's 6-epoch budget was set where the kNN curve flattens, and the one 24-epoch run of the
# recipe row (docs/results/fmnist_cpu_study2/long_24ep) gained +0.8 kNN and +0.9 linear over it: does the learned
# τ's 6-epoch kNN edge over the best constant survive a longer run?
SETTINGS_LONG = ["simclr-fixed-0.2-outbn", "simclr-learnable-log-bounded-outbn"]
# τ as an OOD score: the per-sample τ modes and the fixed-τ run (its kNN distance is the baseline score).
# Held out: 8 Bag and 9 Ankle boot, one far shift (no kept class looks like a bag) and one near shift (ankle
# boots resemble the Sneaker and Sandal that stay in), so the AUROC is not a footwear-only test as [5, 9]
# (Sandal, Ankle boot) would make it; as in the README's example of data.classes.
OOD_SETTINGS = ["simclr-conditional", "simclr-conditional-dro", "simclr-dro-per-sample", "simclr-fixed-0.2"]
OOD_CLASSES = [0, 1, 2, 3, 4, 5, 6, 7]

PRESETS: Dict[str, Dict[str, Any]] = {
    # backbone / epochs / batch live in the configs; the comments there say why
    "cpu": {"simclr": "configs/fmnist_study_cpu.yaml", "mocov2": "configs/fmnist_study_mocov2_cpu.yaml",
            "seeds": [0], "spread_seeds": [1], "jobs": 2, "settings": SETTINGS_ROUND1, "spread_runs": SPREAD_RUNS,
            "out": "runs/fmnist-study"},
    "gpu": {"simclr": "configs/fmnist_simclr_gpu.yaml", "mocov2": "configs/fmnist_mocov2_gpu.yaml",
            "seeds": [0, 1, 2], "spread_seeds": [], "jobs": 1, "settings": SETTINGS_ROUND1, "spread_runs": SPREAD_RUNS,
            "out": "runs/fmnist-study"},
    # round two: 5 seeds for fixed 0.2 and (--best-learned, --second-learned) the best two learned modes
    "cpu2": {"simclr": "configs/fmnist_study2_cpu.yaml", "mocov2": "configs/fmnist_study2_mocov2_cpu.yaml",
             "seeds": [0, 1, 2], "spread_seeds": [3, 4], "jobs": 2, "settings": SETTINGS_ROUND2,
             "spread_runs": ["simclr-fixed-0.2"], "out": "runs/fmnist-study2",
             "ood": {"settings": OOD_SETTINGS, "classes": OOD_CLASSES, "seeds": [0, 1, 2]}},
    # cpu2's configs at 4x the budget, every setting paired against the recipe row (the preset's reference)
    "cpu2-long": {"simclr": "configs/fmnist_study2_cpu.yaml", "mocov2": "configs/fmnist_study2_mocov2_cpu.yaml",
                  "seeds": [0, 1, 2], "spread_seeds": [], "jobs": 2, "settings": SETTINGS_LONG, "spread_runs": [],
                  "out": "runs/fmnist-study2-long", "overrides": ["train.epochs=24", "eval.online_knn_every=4"],
                  "reference": "simclr-fixed-0.2-outbn"},
}


def _tau_mode(spec: Dict[str, Any]) -> str:
    return next(o.split("=", 1)[1] for o in spec["overrides"] if o.startswith("temperature.mode="))


def _robust(spec: Dict[str, Any]) -> bool:
    """τ trained by the robust (dro) objective, which rejects loss.decoupled (it is decoupled already)."""
    return "temperature.mode=dro" in spec["overrides"] or "temperature.objective=dro" in spec["overrides"]


# the SimCLR settings whose τ is learned or follows the data: candidates for --best-learned
LEARNED = [name for name, spec in RUNS.items() if spec["method"] == "simclr" and "loss.decoupled=true" not in
           spec["overrides"] and _tau_mode(spec) in ("learnable", "conditional", "dro", "adaptive")]
# the constants a learned τ must beat: SimCLR with a fixed τ and nothing else changed (not DCL, MoCo, the -outbn row)
FIXED_TAU = [name for name, spec in RUNS.items() if spec["method"] == "simclr" and _tau_mode(spec) == "fixed"
             and all(o.startswith("temperature.") for o in spec["overrides"])]


def derived_runs(best: Optional[str]) -> Tuple[Dict[str, Dict[str, Any]], List[str]]:
    """The DCL and MoCo v2 variants of the best learned mode ``simclr-<mode>``: ``simclr-dcl-<mode>`` (its
    overrides + loss.decoupled=true) and ``mocov2-<mode>`` (its overrides under MoCo v2), and notes on what
    was not planned."""
    if best is None:
        return {}, ["--best-learned not given: DCL and MoCo v2 with the best learned mode are not planned (read the "
                    "best two learned modes off results.md, then rerun with --best-learned NAME --second-learned NAME)"]
    spec, mode = RUNS[best], best.removeprefix("simclr-")
    out: Dict[str, Dict[str, Any]] = {}
    notes = []
    if _robust(spec):
        notes.append(f"simclr-dcl-{mode}: not applicable, skipped ({best} trains τ by the robust objective, whose "
                     f"negatives exclude the positive already: loss.decoupled is rejected with it)")
    else:
        out[f"simclr-dcl-{mode}"] = {"method": "simclr", "overrides": [*spec["overrides"], "loss.decoupled=true"]}
    out[f"mocov2-{mode}"] = {"method": "mocov2", "overrides": list(spec["overrides"])}
    for name, s in out.items():  # mocov2-learnable-log is a round-one setting already: the same run
        assert RUNS.get(name, s) == s, f"{name}: derived differently from the RUNS entry of that name"
    return out, notes


# each objective's own constant, the reference of a derived run (simclr-dcl-<mode>, mocov2-<mode>)
OBJECTIVE_REFERENCE = {"simclr-dcl-": "simclr-dcl-fixed-0.2", "mocov2-": "mocov2-fixed-0.2"}


def objective_pairs(best: Optional[str], reference: str = REFERENCE) -> List[Tuple[str, str]]:
    """Part B's comparisons: the best learned mode against fixed τ = 0.2 under each objective it runs with, its
    own (``simclr-<mode>`` vs ``reference``, the preset's: simclr-fixed-0.2 but for cpu2-long) and the derived
    ones (``simclr-dcl-<mode>`` vs simclr-dcl-fixed-0.2, ``mocov2-<mode>`` vs mocov2-fixed-0.2): does what τ
    learns carry over?"""
    if best is None:
        return []
    return [(best, reference), *[(name, next(ref for prefix, ref in OBJECTIVE_REFERENCE.items()
                                             if name.startswith(prefix))) for name in derived_runs(best)[0]]]


@dataclass
class Step:
    cmd: List[str]
    output: Optional[Path]  # the file whose existence means the step is done (None: always run)
    intermediate: bool = False  # its output is only an input of the later steps (the encoder of a pretraining)


@dataclass
class Job:
    name: str  # the setting: a RUNS key or a derived one
    seed: int
    run_dir: Path  # <out>/<label>
    method: str = "simclr"
    steps: List[Step] = field(default_factory=list)

    @property
    def label(self) -> str:  # <setting>-s<seed>, ood-<setting>-s<seed>: run name, log name
        return self.run_dir.name


@dataclass
class Plan:
    jobs: List[Job]  # the table's runs, setting by setting
    ood_jobs: List[Job]  # the held-out-class runs (pretrain on data.classes, then `simclr-tau ood`)
    notes: List[str]  # what was planned differently and why (printed, and in results.md)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value for every run (e.g. train.epochs=1)")
    p.add_argument("--preset", choices=list(PRESETS), default="cpu")
    p.add_argument("--out", default=None, help="study directory (default: the preset's, runs/fmnist-study[2])")
    p.add_argument("--only", nargs="*", choices=list(RUNS), default=None,
                   help="run only these settings (default: the preset's list; no name: none but --best-learned's "
                        "variants and the OOD block)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds for every run (preset default)")
    p.add_argument("--spread-seeds", type=int, nargs="*", default=None,
                   help="extra seeds for --spread-runs only (preset default; none: no extra seeds)")
    p.add_argument("--spread-runs", nargs="*", choices=list(RUNS), default=None,
                   help="the settings that get --spread-seeds (default: the preset's, + --best/--second-learned)")
    p.add_argument("--best-learned", choices=LEARNED, default=None, metavar="NAME",
                   help="the best learned τ mode (read off results.md): adds simclr-dcl-<mode> and mocov2-<mode>, "
                        "and gets the spread seeds")
    p.add_argument("--second-learned", choices=LEARNED, default=None, metavar="NAME",
                   help="the second-best learned τ mode: gets the spread seeds")
    p.add_argument("--ood", action=argparse.BooleanOptionalAction, default=None,
                   help="the held-out-class block (default: on where the preset has one, cpu2)")
    p.add_argument("--ood-seeds", type=int, nargs="+", default=None, help="seeds of the OOD block (preset default)")
    p.add_argument("--jobs", type=int, default=None, help="pipelines run at once (preset default)")
    p.add_argument("--no-baselines", action="store_true", help="skip the pixel and random-init baselines")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--archive", default=None, metavar="DIR",
                   help="mirror the small files of every finished run (configs, metrics, evaluations, logs) into DIR, "
                        "a folder to commit, and first restore from it the runs this study directory lacks: a study "
                        "continues, and --report-only rebuilds its tables, on a fresh clone (scripts/study_archive.py)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild compare/ and results.md from the finished runs, train and evaluate nothing")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    preset = PRESETS[args.preset]
    if args.second_learned is not None and args.second_learned == args.best_learned:
        parser.error("--second-learned must name another mode than --best-learned")
    if args.ood and "ood" not in preset:
        parser.error(f"--ood: preset {args.preset} has no OOD block (cpu2 has)")
    args.ood = "ood" in preset if args.ood is None else args.ood
    args.out = args.out or preset["out"]
    args.reference = preset.get("reference", REFERENCE)  # what every setting is paired against
    args.overrides = [*preset.get("overrides", []), *args.overrides]  # the preset's, then the command line's
    if args.spread_runs is None:
        extra = [n for n in (args.best_learned, args.second_learned) if n is not None]
        args.spread_runs = list(dict.fromkeys([*preset["spread_runs"], *extra]))
    return args


def python_cmd(*args: str) -> List[str]:
    return [sys.executable, "-m", "simclr_tau", *args]


def pretrain_step(args: argparse.Namespace, job: Job, overrides: Sequence[str]) -> Step:
    """``pretrain`` of ``job`` into ``<out>/<label>``, resumed when an interrupted run left its directory."""
    pre = python_cmd("pretrain", str(REPO / PRESETS[args.preset][job.method]), *overrides, *args.overrides,
                     f"train.seed={job.seed}", f"train.output_dir={args.out}", f"train.run_name={job.label}",
                     "train.progress=false")
    if job.run_dir.is_dir() and not (job.run_dir / "encoder.safetensors").is_file():
        pre += ["--resume", "auto"]  # an interrupted run continues from its last checkpoint
    return Step(pre, job.run_dir / "encoder.safetensors", intermediate=True)


def plan(args: argparse.Namespace) -> Plan:
    """One Job per (setting, seed) with its pretrain / knn / linear steps, and the OOD block's Jobs (pretrain on
    data.classes / ood) when ``args.ood``."""
    preset = PRESETS[args.preset]
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    spread = args.spread_seeds if args.spread_seeds is not None else preset["spread_seeds"]
    out = Path(args.out)
    derived, notes = derived_runs(args.best_learned)
    specs = {**RUNS, **derived}
    settings = list(dict.fromkeys([*(args.only if args.only is not None else preset["settings"]), *derived]))
    jobs = []
    for name in settings:
        spec = specs[name]
        run_seeds = list(seeds) + [s for s in spread if name in args.spread_runs and s not in seeds]
        for seed in run_seeds:
            job = Job(name, seed, out / f"{name}-s{seed}", spec["method"])
            ev = job.run_dir / "eval"
            job.steps = [pretrain_step(args, job, spec["overrides"]),
                         Step(python_cmd("knn", str(job.run_dir), "--no-progress"), ev / "knn.json"),
                         Step(python_cmd("linear", str(job.run_dir), "--no-progress"), ev / "linear.json")]
            jobs.append(job)
    ood_jobs = []
    if args.ood:
        block = preset["ood"]
        classes = "data.classes=[" + ",".join(map(str, block["classes"])) + "]"
        for name in block["settings"]:
            for seed in args.ood_seeds or block["seeds"]:
                job = Job(name, seed, out / f"ood-{name}-s{seed}", RUNS[name]["method"])
                job.steps = [pretrain_step(args, job, [*RUNS[name]["overrides"], classes]),
                             Step(python_cmd("ood", str(job.run_dir), "--no-progress"),
                                  job.run_dir / "eval" / "ood.json")]
                ood_jobs.append(job)
    return Plan(jobs, ood_jobs, notes)


def with_earlier_runs(args: argparse.Namespace, study: Plan) -> Plan:
    """``study`` plus the evaluated runs that an earlier invocation left in the study directory and this one does
    not plan (another ``--only``, other seeds, the OOD block under ``--no-ood``), so that the report is the
    study's whichever part of it this invocation ran. They follow the planned runs, setting by setting in the
    order of :data:`RUNS` (then the derived settings), seed by seed. A run counts once its kNN evaluation (an
    OOD run: its ``ood.json``) is written: one still training in another invocation stays out."""
    out = Path(args.out)
    known = {**RUNS, **{n: s for best in LEARNED for n, s in derived_runs(best)[0].items()}}
    ood_settings = PRESETS[args.preset].get("ood", {}).get("settings", [])
    planned = {j.run_dir for j in study.jobs + study.ood_jobs}
    found: Dict[bool, List[Job]] = {False: [], True: []}  # by: is an OOD run
    for d in sorted(out.iterdir()) if out.is_dir() else []:
        ood = d.name.startswith("ood-")
        name, sep, seed = d.name.removeprefix("ood-").rpartition("-s")
        if (sep and seed.isdigit() and d not in planned and name in (ood_settings if ood else known)
                and (d / "eval" / ("ood.json" if ood else "knn.json")).is_file()):
            found[ood].append(Job(name, int(seed), d, known[name]["method"]))
    order = list(known)
    for jobs in found.values():
        jobs.sort(key=lambda j: (order.index(j.name), j.seed))
    return Plan([*study.jobs, *found[False]], [*study.ood_jobs, *found[True]], study.notes)


def schedule(jobs: List[Job]) -> List[Job]:
    """The order the pool starts ``jobs`` in: seed by seed (in the order the seeds were given), so that every
    setting's first seed finishes before any setting's second — an interrupted study holds paired results."""
    order = list(dict.fromkeys(j.seed for j in jobs))
    return sorted(jobs, key=lambda j: order.index(j.seed))


def evaluated(job: Job) -> bool:
    """Whether ``job`` has a run record to tabulate (pretrained here, or restored from an archive)."""
    return (job.run_dir / "summary.json").is_file()


def complete(job: Job) -> bool:
    """Whether every step of ``job`` is done (the run can be archived)."""
    return not pending_steps(job.steps)


def random_init_dir(args: argparse.Namespace, jobs: List[Job]) -> Optional[Path]:
    """The run directory that holds the random-init baseline (``--random-init`` reads the architecture from its
    exported encoder's metadata; the baseline's json files go into its eval/). In order: a run of the study that
    holds the results already (an earlier invocation evaluated them there; the reference's runs first), so that a
    study run in parts, ``--only`` by ``--only``, evaluates the baseline once and keeps it in one place; the
    reference setting's first seed that this invocation plans, else that an earlier one left; else the first
    SimCLR run. A run restored from an archive has no weights and cannot host it: it is passed over."""
    out, prefix = Path(args.out), f"{args.reference}-s"
    held = [d for d in (sorted(out.iterdir()) if out.is_dir() else [])
            if not d.name.startswith("ood-") and (d / "config.yaml").is_file() and has_random_init(d)]
    if held:
        return min(held, key=lambda d: not d.name.startswith(prefix))
    planned = [j for j in jobs if j.name == args.reference and can_host_random_init(j.run_dir)]
    if planned:
        return min(planned, key=lambda j: j.seed).run_dir
    earlier = sorted(int(d.name[len(prefix):]) for d in out.glob(f"{prefix}*")
                     if d.name[len(prefix):].isdigit() and (d / "config.yaml").is_file() and can_host_random_init(d))
    if earlier:
        return out / f"{prefix}{earlier[0]}"
    return next((j.run_dir for j in jobs if j.method == "simclr" and can_host_random_init(j.run_dir)), None)


def can_host_random_init(run_dir: Path) -> bool:
    """Whether the random-init baseline can be evaluated in ``run_dir``: it holds its encoder, or will (not
    pretrained yet; a run restored from an archive is finished and has no weights)."""
    return (run_dir / "encoder.safetensors").is_file() or not (run_dir / "summary.json").is_file()


def has_random_init(run_dir: Path) -> bool:
    """Whether the random-init baseline's kNN and linear-probe results are in ``run_dir``/eval."""
    return all((run_dir / "eval" / f"{sub}_random_init.json").is_file() for sub in ("knn", "linear"))


def baseline_steps(args: argparse.Namespace, jobs: List[Job]) -> Tuple[List[Step], List[Step]]:
    """(raw pixels, random-init encoder) steps, kNN + linear each (and, with the OOD block, the pixels' OOD
    scores on the same held-out classes). The random-init ones read the reference run's encoder metadata and write
    eval/knn_random_init.json, linear_random_init.json next to its own results."""
    config = str(REPO / PRESETS[args.preset]["simclr"])
    pix = Path(args.out) / "baselines" / "pixels"
    pixels = [Step(python_cmd(sub, "pixels", "--config", config, "--out", str(pix), "--no-progress", *args.overrides),
                   pix / f"{sub}.json") for sub in ("knn", "linear")]
    if args.ood:
        pix_ood, classes = pixel_ood_dir(args), ",".join(map(str, PRESETS[args.preset]["ood"]["classes"]))
        pixels.append(Step(python_cmd("ood", "pixels", "--config", config, f"data.classes=[{classes}]", *args.overrides,
                                      "--out", str(pix_ood), "--no-progress"), pix_ood / "ood.json"))
    ref = random_init_dir(args, jobs)
    random_init = [] if ref is None else [
        Step(python_cmd(sub, str(ref), "--random-init", "--no-progress"),
             ref / "eval" / f"{sub}_random_init.json") for sub in ("knn", "linear")]
    return pixels, random_init


def pixel_ood_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) / "baselines" / "pixels-ood"


def compare_step(args: argparse.Namespace, jobs: List[Job]) -> Step:
    """The comparison of the runs; the raw-pixel baseline's directory joins it when its results exist (the
    random-init results sit in the reference run's summary, which compare reads anyway)."""
    pix = Path(args.out) / "baselines" / "pixels"
    pixels = [str(pix)] if not args.no_baselines and any((pix / n).is_file() for n in ("knn.json", "linear.json")) else []
    return Step(python_cmd("compare", *[str(j.run_dir) for j in jobs], *pixels, "--out", str(Path(args.out) / "compare"),
                           "--metric", "diag/alignment", "--metric", "diag/uniformity",
                           *(["--no-baselines"] if args.no_baselines else [])), None)


def done(step: Step) -> bool:
    return step.output is not None and step.output.is_file()


def pending_steps(steps: List[Step]) -> List[Step]:
    """The steps still to run: those whose output is missing, except an intermediate step all of whose successors
    are done — a run restored from an archive has its evaluations but no encoder, and is not pretrained again."""
    return [s for i, s in enumerate(steps)
            if not done(s) and not (s.intermediate and i + 1 < len(steps) and all(map(done, steps[i + 1:])))]


def run_steps(label: str, steps: List[Step], log_dir: Path, env: Dict[str, str]) -> bool:
    """Run the :func:`pending_steps` of ``steps`` in order, appending to ``log_dir/<label>.log``. True if all
    passed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{label}.log", "a") as log:
        for step in pending_steps(steps):
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


def run_row(job: Job, seconds: Dict[Tuple[str, str], float]) -> Dict[str, Any]:
    """One run's figures, read with the comparison's own loader (summary.json merged over metrics.jsonl)."""
    row: Dict[str, Any] = {"run": job.name, "seed": job.seed, "run_dir": str(job.run_dir)}
    if not (job.run_dir / "summary.json").is_file():
        return row  # not started / still in its first steps
    r = load_run_dir(job.run_dir)
    row.update({k: v for k, v in r.final.items() if k.startswith("knn/top1_") or k in FIGURES})
    row["tau"] = final_tau(r)  # scalar τ, or the batch mean of a per-sample τ
    rankme = r.final.get(RANKME)  # of the final encoder: the online kNN runs at the last epoch too
    row[RANKME] = rankme if rankme is not None and math.isfinite(rankme) else None
    for k in TAU_STATS:  # a dro τ's state: quantiles of all τ_i, the fraction of them at a bound
        if f"train/{k}" in r.final:
            row[k] = r.final[f"train/{k}"]
    row["train_min"] = train_minutes(r)
    pre = seconds.get((job.label, "pretrain"))  # wall time of the last invocation only (a resumed run: its last piece)
    row["pretrain_wall_min"] = None if pre is None else pre / 60
    return row


def train_minutes(r: Any) -> Optional[float]:
    """Training minutes of a run from its own log, over every piece of a resumed run: Σ over the logged rows of
    (steps since the previous row) × batch / images/s; online evaluation and start-up are not in it."""
    batch = (r.config or {}).get("train.batch_size")
    rows = [(h["step"], h["train/images_per_s"]) for h in r.history
            if isinstance(h.get("train/images_per_s"), (int, float)) and h["train/images_per_s"] > 0 and "step" in h]
    if not batch or not rows:
        return None
    total, prev = 0.0, 0
    for step, ips in rows:
        total += (step - prev) * batch / ips
        prev = step
    return total / 60


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
    ref = random_init_dir(args, jobs)
    if ref is not None and (ref / "summary.json").is_file():
        final = load_run_dir(ref).final
        rows.append({"run": "random-init encoder",
                     **_renamed(final, {"knn_random_init/": "knn/", "linear_random_init/": "linear/"})})
    return rows


def ood_row(job: Job) -> Dict[str, Any]:
    """One OOD run's figures from its eval/ood.json (only the setting and seed while it is not written yet)."""
    path = job.run_dir / "eval" / "ood.json"
    row: Dict[str, Any] = {"run": job.name, "seed": job.seed, "run_dir": str(job.run_dir)}
    return {**row, **ood_record(json.loads(path.read_text()))} if path.is_file() else row


def pixel_ood_row(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    path = pixel_ood_dir(args) / "ood.json"
    return ood_record(json.loads(path.read_text())) if not args.no_baselines and path.is_file() else None


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} CPU cores, {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def write_results(args: argparse.Namespace, study: Plan, wall_s: float, wall_what: str = "wall time of this invocation"
                  ) -> str:
    """results.md / results.json over ``study``'s runs (in :func:`main`: :func:`with_earlier_runs` of the plan)."""
    seconds = step_seconds(Path(args.out))
    jobs = study.jobs
    rows = [run_row(j, seconds) for j in jobs]
    agg, base = aggregate(rows), ([] if args.no_baselines else baseline_rows(args, jobs))
    notes = verdict(agg, base)
    keys = [*knn_columns(rows), LINEAR]
    diffs = paired_differences(rows, keys, args.reference)
    main_keys = [k for k in (primary_knn(knn_columns(rows)), LINEAR) if k is not None]
    summary = summary_table(agg, diffs, main_keys, base, args.reference) if any(a["seeds"] for a in agg) else ""
    best = vs_best_fixed(rows, agg, main_keys, LEARNED, FIXED_TAU)
    best_md = vs_best_fixed_table(best, main_keys)
    by_objective = vs_references(rows, main_keys, objective_pairs(args.best_learned, args.reference))
    objective_md = vs_references_table(by_objective, main_keys)
    verdicts = mode_verdicts(agg, diffs, main_keys, args.reference) if any(a["seeds"] for a in agg) else []
    selection = [rankme_line(agg)] if any(a["seeds"] for a in agg) else []
    ranking = learned_ranking_line(agg, LEARNED, (args.best_learned, args.second_learned))
    ood_rows = [ood_row(j) for j in study.ood_jobs]
    ood_agg = ood_aggregate(ood_rows)
    pix_ood = pixel_ood_row(args)
    out = Path(args.out)
    plots, plot_notes = write_study_plots(  # the evaluated seeds, as in the tables
        load_study_runs((j.name, j.seed, j.run_dir) for j, r in zip(jobs, rows) if knn_columns([r])), diffs,
        main_keys, out / "plots", next((b for b in base if b["run"] == "raw pixels"), None), reference=args.reference)
    cmd = shlex.join([Path(sys.executable).name, *sys.argv])
    md = "\n".join([
        f"# Fashion-MNIST τ study ({args.preset} preset)", "",
        f"Command: `{cmd}`  ", f"Machine: {machine()}  ", f"Time: {wall_s / 60:.1f} min ({wall_what})", "",
        *([*[f"- plan: {n}" for n in study.notes], ""] if study.notes else []),
        "Test-set top-1 (%) on the 10k Fashion-MNIST test images; mean ± sample std over seeds where several ran.", "",
        *([f"The answer: each setting against {args.reference}, paired on the seeds both ran (Δ: mean difference and its "
           "95 % t-interval; better / worse when the interval excludes 0):", "", summary, "",
           *(["The project's question: each learned τ against the best fixed τ of each metric (the constant with the "
              "highest mean on that metric, picked on the same test set, which favours it), paired on the common seeds:",
              "", best_md, ""] if best_md else []),
           *([f"Part B: {args.best_learned}, the best learned mode, against fixed τ = 0.2 under each objective "
              "(SimCLR, DCL, MoCo v2; each paired with that objective's own constant on the common seeds):", "",
              objective_md, ""] if objective_md else []),
           "Every figure:", ""] if summary else []),
        markdown_table(agg, base), "", *[f"- {n}" for n in [*notes, *selection, *([ranking] if ranking else [])]], "",
        *([f"Verdict per setting against {args.reference}: mean ± std over its seeds, and the paired difference on the "
           "seeds both ran, mean [95 % t-interval] (better / worse when the interval excludes 0):", "",
           *[f"- {v}" for v in verdicts], ""] if verdicts else []),
        *([f"Paired differences to {args.reference} (same seeds), mean [95 % t-interval] and verdict:", "",
           paired_table(diffs, keys), ""] if diffs else []),
        *(["τ statistics at the end of training (mean over seeds):", "", tau_table(agg), ""] if tau_table(agg) else []),
        *(["## τ as an out-of-distribution score (`simclr-tau ood`)", "", ood_table(ood_agg, ood_rows, pix_ood), ""]
          if study.ood_jobs else []),
        "Plots, one line per setting: " + (", ".join(f"`{p.relative_to(out)}`" for p in plots) or "none") + "; one "
        "line per run: `compare/` (kNN vs epoch, loss and τ vs step, final metrics), `compare/report.html`.",
        *[f"- {n}" for n in plot_notes], ""])
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"rows": rows, "aggregate": agg, "baselines": base, "verdict": notes,
                                                  "paired": diffs, "verdict_per_setting": verdicts, "summary_table": summary,
                                                  "vs_best_fixed": best, "vs_best_fixed_table": best_md,
                                                  "by_objective": by_objective, "by_objective_table": objective_md,
                                                  "rankme": selection, "learned_ranking": ranking,
                                                  "ood": {"rows": ood_rows, "aggregate": ood_agg, "pixels": pix_ood},
                                                  "plan_notes": study.notes,
                                                  "plots": [str(p.relative_to(out)) for p in plots],
                                                  "machine": machine(), "wall_s": wall_s, "command": cmd}, indent=2))
    return md


def subprocess_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``python -m simclr_tau`` imports this checkout even when it is not installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **(extra or {})}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    jobs_n = args.jobs or preset["jobs"]
    out = Path(args.out)
    archive_dir = Path(args.archive) if args.archive else None
    if archive_dir is not None and not args.dry_run:  # before planning: a restored run is a finished one
        restored = restore(archive_dir, out)
        runs = {f.parts[0] for f in restored} - {"logs", "baselines"}
        print(f"restored from {archive_dir}: {len(runs)} runs, {len(restored)} files", flush=True)
    study = plan(args)
    jobs, ood_jobs = study.jobs, study.ood_jobs
    pixel_steps, random_steps = ([], []) if args.no_baselines else baseline_steps(args, jobs)
    logs = Path(args.out) / "logs"
    if args.dry_run:  # a shell script: the notes as comments, then every command in the order it would start
        for note in study.notes:
            print(f"# {note}")
        for step in ([s for j in schedule(jobs) + schedule(ood_jobs) for s in j.steps] + pixel_steps + random_steps
                     + ([compare_step(args, jobs)] if jobs else [])):
            print(shlex.join(step.cmd))
        return 0
    for note in study.notes:
        print(note, flush=True)
    t0 = time.time()
    if args.report_only:
        report = with_earlier_runs(args, study)
        finished = [j for j in report.jobs if evaluated(j)]
        ok = run_steps("compare", [compare_step(args, finished)], logs, subprocess_env()) if finished else True
        wall = sum(step_seconds(Path(args.out)).values())  # a rebuilt report has no wall clock of its own
        md = write_results(args, report, wall, "sum of the recorded step times; steps ran --jobs at a time")
        if archive_dir is not None:  # what finished meanwhile (a study running beside this one) is archived too
            archive(out, archive_dir, [j.label for j in jobs + ood_jobs if complete(j)])
        print("\n" + md, flush=True)
        return 0 if ok else 1
    threads = max(1, (os.cpu_count() or 1) // jobs_n)
    env = subprocess_env({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
                          "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", f"fmnist-study-{args.preset}")})
    print(f"{len(jobs)} runs + {len(ood_jobs)} OOD runs, {jobs_n} at a time ({env['OMP_NUM_THREADS']} threads each); "
          f"logs in {logs}", flush=True)
    lock = threading.Lock()

    def pipeline(label: str, steps: List[Step], runs: Sequence[str]) -> bool:
        passed = run_steps(label, steps, logs, env)
        if passed and archive_dir is not None:  # a finished run goes into the archive at once
            with lock:
                archive(out, archive_dir, runs)
        return passed

    with ThreadPoolExecutor(jobs_n) as pool:
        futures = [pool.submit(pipeline, j.label, j.steps, [j.label]) for j in schedule(jobs) + schedule(ood_jobs)]
        if pixel_steps:  # one more pipeline in the pool
            futures.append(pool.submit(pipeline, "baselines", pixel_steps, []))
        ok = [f.result() for f in futures]
    if random_steps:  # after the pool: they need the reference run's directory
        ok.append(pipeline("baselines", random_steps, [random_init_dir(args, jobs).name]))
    report = with_earlier_runs(args, study)  # after the pool: what finished meanwhile elsewhere counts too
    finished = [j for j in report.jobs if evaluated(j)]
    if finished:
        ok.append(run_steps("compare", [compare_step(args, finished)], logs, env))
    md = write_results(args, report, time.time() - t0)
    if archive_dir is not None:
        archive(out, archive_dir, [j.label for j in jobs + ood_jobs if complete(j)])
    print("\n" + md, flush=True)
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
