"""scripts/reproduce_fmnist.py: the τ study plans every (setting, seed) with valid configs, runs and evaluates
them for real (tiny synthetic data, real subprocesses), builds the results table from the files the
evaluators wrote, and restarts without redoing finished steps."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from simclr_tau.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce_fmnist.py"
TINY_DATA = ["data.name=synthetic", "data.synthetic_size=64", "data.synthetic_classes=4", "data.synthetic_image_size=16",
             "data.num_workers=0", "train.batch_size=16", "train.max_steps=2", "eval.knn_k=[5,10]",
             "eval.knn_t=[0.07,0.1]", "moco.queue_size=32", "wandb.enabled=false"]


def _module():
    spec = importlib.util.spec_from_file_location("reproduce_fmnist", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_fmnist"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_dry_run_plans_every_setting_with_valid_configs(tmp_path, preset) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", preset, "--out", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.strip().splitlines()]
    pretrain = [a for a in lines if a[3] == "pretrain"]
    mod = _module()
    seeds = mod.PRESETS[preset]["seeds"]
    extra = [s for s in mod.PRESETS[preset]["spread_seeds"] if s not in seeds]
    assert len(pretrain) == len(mod.RUNS) * len(seeds) + len(mod.SPREAD_RUNS) * len(extra)
    assert sum(a[3] == "knn" for a in lines) == len(pretrain) + 2  # + pixels and random init
    assert sum(a[3] == "linear" for a in lines) == len(pretrain) + 2
    assert lines[-1][3] == "compare"
    seen = set()
    for argv in pretrain:
        cfg = load_config(argv[4], argv[5:])
        t = cfg.temperature
        mode = (t.mode, t.init if t.mode != "scheduled" else None, t.parametrization if t.mode == "learnable" else None,
                (t.schedule.kind, t.schedule.start, t.schedule.end) if t.mode == "scheduled" else None)
        if t.mode == "dro" or t.objective == "dro":
            d = t.dro
            mode = (*mode, (t.objective, d.per_sample, d.estimator, d.rho, d.eta))
        elif cfg.loss.decoupled:
            mode = (*mode, "decoupled")
        seen.add((cfg.train.method, mode))
        assert cfg.train.run_name.endswith(f"-s{cfg.train.seed}") and cfg.train.output_dir == str(tmp_path)
        if preset == "gpu":
            assert cfg.model.backbone == "resnet18" and cfg.model.small_stem and cfg.train.epochs >= 100
    assert seen == {
        ("simclr", ("fixed", 0.07, None, None)), ("simclr", ("fixed", 0.2, None, None)),
        ("simclr", ("fixed", 0.5, None, None)), ("simclr", ("learnable", 0.2, "log", None)),
        ("simclr", ("learnable", 0.2, "softplus", None)), ("simclr", ("learnable", 0.2, "relu", None)),
        ("simclr", ("conditional", 0.2, None, None)), ("simclr", ("scheduled", None, None, ("cosine", 0.5, 0.1))),
        ("mocov2", ("fixed", 0.2, None, None)), ("mocov2", ("learnable", 0.2, "log", None)),
        ("simclr", ("dro", 0.2, None, None, ("contrastive", False, "batch", 0.3, 0.01))),
        ("simclr", ("dro", 0.2, None, None, ("contrastive", True, "batch", 0.3, 0.01))),
        ("simclr", ("dro", 0.2, None, None, ("contrastive", True, "sogclr", 0.3, 0.01))),
        ("simclr", ("dro", 0.2, None, None, ("contrastive", False, "batch", 1.0, 0.01))),
        ("simclr", ("dro", 0.2, None, None, ("contrastive", True, "batch", 1.0, 0.05))),
        ("simclr", ("dro", 0.2, None, None, ("contrastive", True, "sogclr", 1.0, 0.05))),
        ("simclr", ("conditional", 0.2, None, None, ("dro", False, "batch", 0.3, 0.01))),
        ("simclr", ("adaptive", 0.2, None, None)), ("simclr", ("fixed", 0.2, None, None, "decoupled")),
    }


def test_aggregate_mean_and_sample_std_and_verdict() -> None:
    mod = _module()
    k20, lin = "knn/top1_k20_t0.07", "linear/test_top1"
    rows = [{"run": "a", "seed": s, k20: v, lin: v + 1} for s, v in ((0, 80.0), (1, 82.0), (2, 84.0))]
    rows.append({"run": "b", "seed": 0, k20: 79.0, lin: 90.0})
    rows.append({"run": "b", "seed": 1})  # still training: not counted
    agg = mod.aggregate(rows)
    a, b = agg
    assert a["seeds"] == [0, 1, 2] and a["mean"][k20] == pytest.approx(82.0)
    assert a["std"][k20] == pytest.approx(2.0)  # sample std of 80, 82, 84
    assert b["seeds"] == [0] and b["std"][k20] is None and b["mean"][lin] == 90.0
    notes = mod.verdict(agg, [{"run": "raw pixels", k20: 81.0}])
    assert "kNN k=20 T=0.07: 1/2 runs beat the raw pixels (81.00); not: b" in notes
    assert any(n.startswith("best linear probe: b 90.00, ahead of a by 7.00") and "larger than seed noise" in n
               for n in notes)
    assert notes[-1].endswith("above")  # 90.0 > SVC 89.7
    table = mod.markdown_table(agg, [])
    assert "| a | 0,1,2 | 82.00 ± 2.00 | 83.00 ± 2.00 |" in table


@pytest.mark.slow
def test_study_runs_evaluates_tabulates_and_restarts(tmp_path) -> None:
    out = tmp_path / "study"
    env = {**os.environ, "WANDB_MODE": "disabled"}
    cmd = [sys.executable, str(SCRIPT), *TINY_DATA, "--preset", "cpu", "--out", str(out), "--jobs", "2", "--seeds", "0",
           "--spread-seeds", "1", "--spread-runs", "simclr-learnable-log",
           "--only", "simclr-learnable-log", "mocov2-fixed-0.2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [(r["run"], r["seed"]) for r in res["rows"]] == [("simclr-learnable-log", 0), ("simclr-learnable-log", 1),
                                                            ("mocov2-fixed-0.2", 0)]
    for r in res["rows"]:  # the figures are the evaluators' own files
        knn = json.loads((Path(r["run_dir"]) / "eval" / "knn.json").read_text())
        assert r["knn/top1_k5_t0.07"] == knn["results"][0]["top1"] and r["knn/top1_k10_t0.1"] == knn["results"][1]["top1"]
        lin = json.loads((Path(r["run_dir"]) / "eval" / "linear.json").read_text())
        assert r["linear/test_top1"] == lin["metrics"]["linear/test_top1"]
        assert r["calib/ece_after"] == lin["metrics"]["calib/ece_after"]
        assert r["tau"] > 0 and r["diag/alignment"] is not None and r["pretrain_min"] > 0
    learn = res["aggregate"][0]
    assert learn["seeds"] == [0, 1] and learn["std"]["knn/top1_k5_t0.07"] is not None
    pixels, rand = res["baselines"]
    assert pixels["run"] == "raw pixels" and rand["run"] == "random-init encoder"
    pix_knn = json.loads((out / "baselines" / "pixels" / "knn.json").read_text())
    assert pixels["knn/top1_k5_t0.07"] == pix_knn["results"][0]["top1"] and pixels["linear/test_top1"] is not None
    ref = Path(res["rows"][0]["run_dir"]) / "eval"
    assert rand["knn/top1_k10_t0.1"] == json.loads((ref / "knn_random_init.json").read_text())["results"][1]["top1"]
    assert rand["linear/test_top1"] == json.loads((ref / "linear_random_init.json").read_text())["metrics"][
        "linear_random_init/test_top1"]
    md = (out / "results.md").read_text()
    assert "| simclr-learnable-log | 0,1 |" in md and "*raw pixels*" in md and "paper: SVC" in md
    report = (out / "compare" / "report.html").read_text()  # the baselines are rows of the comparison too
    assert "<td>baseline: raw pixels</td>" in report and "<td>baseline: random init</td>" in report
    # restart: every step is found done, nothing is re-run
    stamp = (out / "simclr-learnable-log-s0" / "eval" / "knn.json").stat().st_mtime_ns
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ": pretrain " not in proc.stdout and ": knn " not in proc.stdout
    assert (out / "simclr-learnable-log-s0" / "eval" / "knn.json").stat().st_mtime_ns == stamp
    # --report-only rebuilds the table from the files alone
    (out / "results.md").unlink()
    proc = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "results.md").read_text()
    assert "sum of the recorded step times" in md and "| simclr-learnable-log | 0,1 |" in md


def test_paired_differences_use_common_seeds_and_a_t_interval() -> None:
    K = "knn/top1_k20_t0.07"
    rows = [{"run": "simclr-fixed-0.2", "seed": s, K: v} for s, v in ((0, 80.0), (1, 81.0), (2, 82.0))]
    rows += [{"run": "a", "seed": s, K: v} for s, v in ((0, 81.0), (1, 82.5), (2, 83.0))]  # +1, +1.5, +1
    rows += [{"run": "b", "seed": s, K: v} for s, v in ((0, 79.0), (1, 83.0))]  # -1, +2: no evidence
    rows += [{"run": "c", "seed": 5, K: 90.0}]  # no common seed
    repro = _module()
    diffs = {d["run"]: d for d in repro.paired_differences(rows, [K])}
    a = diffs["a"]
    sd = statistics.stdev([1.0, 1.5, 1.0])
    assert a["seeds"] == [0, 1, 2] and a["mean"] == pytest.approx(7 / 6)
    assert a["hi"] - a["mean"] == pytest.approx(4.303 * sd / math.sqrt(3))  # t_{0.975, 2}
    assert a["verdict"] == "better"
    assert diffs["b"]["verdict"] == "no evidence" and diffs["b"]["lo"] < 0 < diffs["b"]["hi"]
    assert diffs["c"]["n"] == 0 and diffs["c"]["mean"] is None
    worse = repro.paired_differences([*rows[:3], *[{"run": "w", "seed": s, K: 70.0 + s} for s in (0, 1, 2)]], [K])
    assert worse[0]["verdict"] == "worse"
    table = repro.paired_table(list(diffs.values()), [K])
    assert "| a | 0,1,2 | +1.17 [" in table and "better" in table
