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
    lines = [line.split() for line in proc.stdout.strip().splitlines() if not line.startswith("#")]
    pretrain = [a for a in lines if a[3] == "pretrain"]
    mod = _module()
    seeds = mod.PRESETS[preset]["seeds"]
    extra = [s for s in mod.PRESETS[preset]["spread_seeds"] if s not in seeds]
    assert mod.PRESETS[preset]["settings"] == mod.SETTINGS_ROUND1 and "ood" not in mod.PRESETS[preset]
    assert len(pretrain) == len(mod.SETTINGS_ROUND1) * len(seeds) + len(mod.SPREAD_RUNS) * len(extra)
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
           "--only", "simclr-learnable-log", "mocov2-fixed-0.2", "--archive", str(tmp_path / "archive")]
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
        assert r["tau"] > 0 and r["diag/alignment"] is not None and r["train_min"] > 0 and r["pretrain_wall_min"] > 0
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
    # the machine is lost: the archive alone continues the study, trains nothing and tabulates the same figures
    assert not list((tmp_path / "archive").rglob("*.safetensors")) and not list((tmp_path / "archive").rglob("*.pt"))
    import shutil
    shutil.rmtree(out)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "restored from" in proc.stdout and ": pretrain " not in proc.stdout and ": knn " not in proc.stdout
    again = json.loads((out / "results.json").read_text())
    keys = ["knn/top1_k5_t0.07", "linear/test_top1", "tau", "train_min", "pretrain_wall_min"]
    assert [[r[k] for k in keys] for r in again["rows"]] == [[r[k] for k in keys] for r in res["rows"]]
    assert again["baselines"] == res["baselines"] and again["plots"] == res["plots"]
    assert "<td>baseline: raw pixels</td>" in (out / "compare" / "report.html").read_text()  # compare read them too
    assert (out / "compare" / "tau_vs_step.png").is_file()


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
    LIN = "linear/test_top1"  # a run whose linear probe has not finished on seed 1: that metric pairs on 0 only
    pending = [{**r, LIN: 85.0} for r in rows[:3]] + [{**rows[3], LIN: 86.0}, rows[4]]
    lin = {d["metric"]: d for d in repro.paired_differences(pending, [K, LIN])}
    assert lin[K]["seeds"] == [0, 1] and lin[K]["n"] == 2 and lin[LIN]["seeds"] == [0] and lin[LIN]["n"] == 1
    assert lin[LIN]["mean"] == 1.0 and lin[LIN]["lo"] is None


# ---- round two: preset cpu2 ------------------------------------------------------------------------------

K20, K200, LIN = "knn/top1_k20_t0.07", "knn/top1_k200_t0.1", "linear/test_top1"


def _plan(mod, tmp_path, *argv):
    return mod.plan(mod.parse_args(["--preset", "cpu2", "--out", str(tmp_path), *argv]))


def _seeds(jobs) -> dict:
    out: dict = {}
    for j in jobs:
        out.setdefault(j.name, []).append(j.seed)
    return out


def _config(job):
    argv = job.steps[0].cmd
    assert argv[3] == "pretrain"
    return load_config(argv[4], argv[5:])


def _temperature(cfg) -> tuple:
    t = cfg.temperature
    return (cfg.train.method, t.mode, None if t.mode == "scheduled" else t.init,
            t.parametrization if t.mode == "learnable" else None, t.tau_min, t.tau_max,
            (t.objective, t.dro.per_sample, t.dro.estimator) if t.mode == "dro" or t.objective == "dro" else None,
            (t.schedule.kind, t.schedule.start, t.schedule.end) if t.mode == "scheduled" else None, cfg.loss.decoupled)


ROUND2 = {  # setting: (method, mode, init, parametrization, tau_min, tau_max, dro, schedule, decoupled)
    "simclr-fixed-0.05": ("simclr", "fixed", 0.05, None, None, None, None, None, False),
    "simclr-fixed-0.1": ("simclr", "fixed", 0.1, None, None, None, None, None, False),
    "simclr-fixed-0.2": ("simclr", "fixed", 0.2, None, None, None, None, None, False),
    "simclr-fixed-0.5": ("simclr", "fixed", 0.5, None, None, None, None, None, False),
    "simclr-learnable-log": ("simclr", "learnable", 0.2, "log", None, None, None, None, False),
    "simclr-learnable-log-bounded": ("simclr", "learnable", 0.2, "log", 0.05, 1.0, None, None, False),
    "simclr-dro-global": ("simclr", "dro", 0.2, None, None, None, ("contrastive", False, "batch"), None, False),
    "simclr-dro-per-sample": ("simclr", "dro", 0.2, None, None, None, ("contrastive", True, "batch"), None, False),
    "simclr-dro-per-sample-sogclr": ("simclr", "dro", 0.2, None, None, None, ("contrastive", True, "sogclr"), None,
                                     False),
    "simclr-conditional": ("simclr", "conditional", 0.2, None, 0.05, 1.0, None, None, False),
    "simclr-conditional-dro": ("simclr", "conditional", 0.2, None, 0.05, 1.0, ("dro", False, "batch"), None, False),
    "simclr-adaptive": ("simclr", "adaptive", 0.2, None, None, None, None, None, False),
    "simclr-cosine": ("simclr", "scheduled", None, None, None, None, None, ("cosine", 0.5, 0.1), False),
    "simclr-dcl-fixed-0.2": ("simclr", "fixed", 0.2, None, None, None, None, None, True),
    "mocov2-fixed-0.2": ("mocov2", "fixed", 0.2, None, None, None, None, None, False),
    "simclr-fixed-0.2-outbn": ("simclr", "fixed", 0.2, None, None, None, None, None, False),  # + the output BN
}


def test_cpu2_plans_round_two_on_the_new_network_with_five_seeds_for_fixed_0_2(tmp_path) -> None:
    mod = _module()
    study = _plan(mod, tmp_path)
    seeds = _seeds(study.jobs)
    assert list(seeds) == list(ROUND2) == mod.SETTINGS_ROUND2
    assert seeds.pop("simclr-fixed-0.2") == [0, 1, 2, 3, 4] and all(s == [0, 1, 2] for s in seeds.values())
    assert len(study.notes) == 1 and study.notes[0].startswith("--best-learned not given")
    for job in study.jobs:
        cfg = _config(job)
        assert _temperature(cfg) == ROUND2[job.name], job.name
        assert (cfg.train.seed, cfg.train.run_name, cfg.train.output_dir) == (job.seed, job.label, str(tmp_path))
        assert job.run_dir == tmp_path / f"{job.name}-s{job.seed}" and [s.cmd[3] for s in job.steps] == [
            "pretrain", "knn", "linear"]
        m = cfg.model
        assert (m.backbone, m.backbone_kwargs["channels"], m.small_stem, m.stem_pool) == (
            "resnet10t", [32, 64, 128, 256], False, False)
        assert cfg.train.epochs == 6 and cfg.eval.online_knn_every == 1 and cfg.data.classes is None
        assert m.proj_out_bn == ("affine" if job.name == "simclr-fixed-0.2-outbn" else "auto"), job.name
    # started seed by seed: every setting's seed 0 before any seed 1
    assert [j.seed for j in mod.schedule(study.jobs)][:len(ROUND2)] == [0] * len(ROUND2)


def test_cpu2_long_runs_the_recipe_row_and_the_bounded_learned_tau_at_24_epochs_paired_on_the_recipe(tmp_path) -> None:
    mod = _module()
    args = mod.parse_args(["--preset", "cpu2-long", "--out", str(tmp_path), "train.max_steps=3"])
    assert args.reference == "simclr-fixed-0.2-outbn" and not args.ood
    study = mod.plan(args)
    assert _seeds(study.jobs) == {"simclr-fixed-0.2-outbn": [0, 1, 2], "simclr-learnable-log-bounded-outbn": [0, 1, 2]}
    for job in study.jobs:
        cfg = _config(job)
        # only τ differs between the two settings: the same head (output BN), network and budget
        assert _temperature(cfg) == {"simclr-fixed-0.2-outbn": ROUND2["simclr-fixed-0.2"],
                                     "simclr-learnable-log-bounded-outbn": ROUND2["simclr-learnable-log-bounded"]}[
            job.name], job.name
        assert cfg.model.proj_out_bn == "affine" and cfg.model.backbone == "resnet10t"
        assert (cfg.train.epochs, cfg.eval.online_knn_every) == (24, 4)
        assert cfg.train.max_steps == 3  # the command line's overrides follow the preset's
    # the random-init baseline sits with the preset's reference, not with a simclr-fixed-0.2 run
    assert mod.random_init_dir(args, study.jobs) == tmp_path / "simclr-fixed-0.2-outbn-s0"
    # the default presets keep fixed 0.2 as their reference and add no overrides
    cpu2 = mod.parse_args(["--preset", "cpu2", "train.epochs=1"])
    assert (cpu2.reference, cpu2.overrides) == ("simclr-fixed-0.2", ["train.epochs=1"])


def test_cpu2_long_report_pairs_every_setting_against_the_recipe_row(tmp_path) -> None:
    runs = {"simclr-fixed-0.2-outbn": ((87.5, 87.8, 87.4), (89.7, 89.8, 89.2)),
            "simclr-learnable-log-bounded-outbn": ((87.9, 88.0, 87.6), (89.5, 89.9, 89.1))}
    for name, (knn, lin) in runs.items():
        for seed in (0, 1, 2):
            _fake_run(tmp_path, f"{name}-s{seed}", {K20: knn[seed], K200: knn[seed] - 2, LIN: lin[seed]}, [40.0])
    mod = _module()
    assert mod.main(["--preset", "cpu2-long", "--out", str(tmp_path), "--report-only", "--no-baselines"]) == 0
    md = (tmp_path / "results.md").read_text()
    # Δ kNN +0.4, +0.2, +0.2 (sd 0.115, t_2 = 4.303: ± 0.287); Δ linear -0.2, +0.1, -0.1 (sd 0.153: ± 0.379)
    assert ("| simclr-learnable-log-bounded-outbn | 0,1,2 | 87.83 ± 0.21 | +0.27 [-0.02, +0.55] | 89.50 ± 0.40 | "
            "-0.07 [-0.45, +0.31] | no evidence | – |") in md
    assert "| simclr-fixed-0.2-outbn | 0,1,2 | 87.57 ± 0.21 | ref. | 89.57 ± 0.32 | ref. | ref. |" in md
    assert "The answer: each setting against simclr-fixed-0.2-outbn, paired" in md
    assert "- simclr-fixed-0.2-outbn (the reference; seeds 0,1,2)" in md
    assert "no simclr-fixed-0.2 run" not in md
    res = json.loads((tmp_path / "results.json").read_text())
    assert {d["reference"] for d in res["paired"]} == {"simclr-fixed-0.2-outbn"}
    assert {"plots/knn_vs_epoch.png", "plots/paired_differences.png"} <= set(res["plots"])


def test_random_init_baseline_stays_with_the_reference_run_across_partial_invocations(tmp_path) -> None:
    mod = _module()

    def ref_dir(*argv):
        args = mod.parse_args(["--preset", "cpu2", "--out", str(tmp_path), *argv])
        study = mod.plan(args)
        _, random_init = mod.baseline_steps(args, study.jobs)
        assert {s.output.parent.parent for s in random_init} == {mod.random_init_dir(args, study.jobs)}
        return mod.random_init_dir(args, study.jobs).name

    assert ref_dir("--only", "simclr-fixed-0.2", "simclr-conditional", "--seeds", "2", "1") == "simclr-fixed-0.2-s1"
    # a part of the study without the reference, and no reference run on disk yet: its first SimCLR run
    assert ref_dir("--only", "mocov2-fixed-0.2", "simclr-conditional") == "simclr-conditional-s0"
    for name in ("simclr-fixed-0.2-outbn-s0", "simclr-fixed-0.2-s3", "simclr-fixed-0.2-s1"):  # not -outbn
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("{}")
    (tmp_path / "simclr-fixed-0.2-s0").mkdir()  # started? no config.yaml yet: not a run directory
    assert ref_dir("--only", "mocov2-fixed-0.2", "simclr-conditional") == "simclr-fixed-0.2-s1"  # an earlier one's
    assert ref_dir("--only", "simclr-fixed-0.2", "simclr-conditional") == "simclr-fixed-0.2-s0"  # planned: first seed
    # seed 0 restored from an archive (finished, no weights, no random-init results): it cannot host the baseline
    (tmp_path / "simclr-fixed-0.2-s0" / "config.yaml").write_text("{}")
    (tmp_path / "simclr-fixed-0.2-s0" / "summary.json").write_text("{}")
    assert ref_dir("--only", "simclr-fixed-0.2", "simclr-conditional") == "simclr-fixed-0.2-s1"
    assert ref_dir("--only", "mocov2-fixed-0.2", "simclr-conditional") == "simclr-fixed-0.2-s1"
    # ... unless it was restored with the baseline's results (archived by the run that evaluated them)
    for sub in ("knn", "linear"):
        (tmp_path / "simclr-fixed-0.2-s0" / "eval").mkdir(exist_ok=True)
        (tmp_path / "simclr-fixed-0.2-s0" / "eval" / f"{sub}_random_init.json").write_text("{}")
    assert ref_dir("--only", "simclr-fixed-0.2", "simclr-conditional") == "simclr-fixed-0.2-s0"
    # every reference run restored without weights: the first SimCLR run that will have an encoder
    for d in ("simclr-fixed-0.2-s0", "simclr-fixed-0.2-s1", "simclr-fixed-0.2-s3"):
        for f in (tmp_path / d / "eval").glob("*_random_init.json"):
            f.unlink()
        (tmp_path / d / "summary.json").write_text("{}")
    # the first planned seed not pretrained yet (seed 2 has no directory) ...
    assert ref_dir("--only", "simclr-fixed-0.2", "simclr-conditional") == "simclr-fixed-0.2-s2"
    # ... and with none left to pretrain, the first SimCLR run that will have an encoder
    assert ref_dir("--only", "simclr-fixed-0.2", "simclr-conditional", "--seeds", "0", "1",
                   "--spread-seeds") == "simclr-conditional-s0"
    # where an earlier invocation evaluated it (in another run, the reference having no weights) it stays there,
    # whatever this invocation plans; a reference run holding it would come first
    other = tmp_path / "simclr-learnable-log-bounded-s0"
    (other / "eval").mkdir(parents=True)
    (other / "config.yaml").write_text("{}")
    (other / "summary.json").write_text("{}")
    for sub in ("knn", "linear"):
        (other / "eval" / f"{sub}_random_init.json").write_text("{}")
    assert ref_dir("--only", "simclr-fixed-0.2", "simclr-conditional") == "simclr-learnable-log-bounded-s0"
    assert ref_dir("--only", "mocov2-fixed-0.2") == "simclr-learnable-log-bounded-s0"
    for sub in ("knn", "linear"):
        (tmp_path / "simclr-fixed-0.2-s3" / "eval").mkdir(exist_ok=True)
        (tmp_path / "simclr-fixed-0.2-s3" / "eval" / f"{sub}_random_init.json").write_text("{}")
    assert ref_dir("--only", "simclr-conditional") == "simclr-fixed-0.2-s3"


def test_cpu2_ood_block_pretrains_on_eight_classes_then_scores_each_run(tmp_path) -> None:
    mod = _module()
    study = _plan(mod, tmp_path)
    assert [(j.name, j.seed) for j in study.ood_jobs] == [(n, s) for n in mod.OOD_SETTINGS for s in (0, 1, 2)]
    assert mod.OOD_SETTINGS == ["simclr-conditional", "simclr-conditional-dro", "simclr-dro-per-sample",
                                "simclr-fixed-0.2"]
    for job in study.ood_jobs:
        cfg = _config(job)
        assert cfg.data.classes == [0, 1, 2, 3, 4, 5, 6, 7] and _temperature(cfg) == ROUND2[job.name]
        assert job.run_dir == tmp_path / f"ood-{job.name}-s{job.seed}" and cfg.train.run_name == job.run_dir.name
        ood = job.steps[1]
        assert ood.cmd[3:5] == ["ood", str(job.run_dir)] and ood.output == job.run_dir / "eval" / "ood.json"
    assert _plan(mod, tmp_path, "--no-ood").ood_jobs == []
    assert [j.seed for j in _plan(mod, tmp_path, "--only", "--ood-seeds", "5").ood_jobs] == [5] * 4
    assert _plan(mod, tmp_path, "--only").jobs == []  # the OOD block alone
    with pytest.raises(SystemExit):
        mod.parse_args(["--preset", "cpu", "--ood"])  # round one has no OOD block


def test_best_learned_adds_its_dcl_and_mocov2_variants_and_five_seeds_for_the_best_two(tmp_path) -> None:
    mod = _module()
    study = _plan(mod, tmp_path, "--best-learned", "simclr-conditional", "--second-learned",
                  "simclr-learnable-log-bounded")
    seeds = _seeds(study.jobs)
    assert list(seeds) == [*mod.SETTINGS_ROUND2, "simclr-dcl-conditional", "mocov2-conditional"] and study.notes == []
    assert {n for n, s in seeds.items() if s == [0, 1, 2, 3, 4]} == {
        "simclr-fixed-0.2", "simclr-conditional", "simclr-learnable-log-bounded"}
    assert all(s == [0, 1, 2] for n, s in seeds.items() if n not in ("simclr-fixed-0.2", "simclr-conditional",
                                                                     "simclr-learnable-log-bounded"))
    first = {j.name: _config(j) for j in study.jobs if j.seed == 0}
    conditional = ROUND2["simclr-conditional"]
    assert _temperature(first["simclr-dcl-conditional"]) == (*conditional[:-1], True)
    assert _temperature(first["mocov2-conditional"]) == ("mocov2", *conditional[1:])
    moco = first["mocov2-conditional"]
    assert moco.moco.queue_size == 4096 and moco.model.stem_pool is False and moco.optim.lr == 0.06
    # a dro mode: DCL does not apply (one line says so), MoCo v2 does
    dro = _plan(mod, tmp_path, "--best-learned", "simclr-dro-per-sample", "--second-learned", "simclr-conditional")
    names = list(_seeds(dro.jobs))
    assert names == [*mod.SETTINGS_ROUND2, "mocov2-dro-per-sample"]
    assert len(dro.notes) == 1 and dro.notes[0].startswith("simclr-dcl-dro-per-sample: not applicable, skipped")
    assert _seeds(dro.jobs)["simclr-dro-per-sample"] == [0, 1, 2, 3, 4]
    for bad in (["--best-learned", "simclr-fixed-0.2"], ["--best-learned", "simclr-adaptive", "--second-learned",
                                                         "simclr-adaptive"]):
        with pytest.raises(SystemExit):
            mod.parse_args(["--preset", "cpu2", *bad])


def test_every_learned_mode_derives_valid_configs_and_dro_ones_skip_dcl() -> None:
    from simclr_tau.errors import UserError

    mod = _module()
    assert "simclr-learnable-log-bounded" in mod.LEARNED and "simclr-cosine" not in mod.LEARNED
    for best in mod.LEARNED:
        derived, notes = mod.derived_runs(best)
        for name, spec in derived.items():
            cfg = load_config(REPO / mod.PRESETS["cpu2"][spec["method"]], spec["overrides"])
            assert cfg.train.method == spec["method"] and cfg.loss.decoupled == name.startswith("simclr-dcl-")
        base = mod.RUNS[best]["overrides"]
        if mod._robust(mod.RUNS[best]):  # the skip is what the config validation would say anyway
            assert list(derived) == [f"mocov2-{best[len('simclr-'):]}"] and len(notes) == 1
            with pytest.raises(UserError, match="loss.decoupled"):
                load_config(REPO / mod.PRESETS["cpu2"]["simclr"], [*base, "loss.decoupled=true"])
        else:
            assert len(derived) == 2 and notes == []
    assert mod.derived_runs("simclr-learnable-log")[0]["mocov2-learnable-log"] == mod.RUNS["mocov2-learnable-log"]


def test_cpu2_dry_run_prints_every_command(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--preset", "cpu2", "--out", str(tmp_path), "--dry-run",
                           "--best-learned", "simclr-conditional", "--second-learned", "simclr-dro-per-sample"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.strip().splitlines()]
    sub = [a[3] for a in lines]
    n_runs = 18 * 3 + 3 * 2  # 16 settings + DCL and MoCo v2 of the best; seeds 3 and 4 for three of them
    assert sub.count("pretrain") == n_runs + 12 and sub.count("ood") == 12 + 1  # + the OOD block and its pixels
    assert sub.count("knn") == sub.count("linear") == n_runs + 2 and sub[-1] == "compare"
    assert not any(a[0].startswith("#") for a in lines)  # nothing left out, so no note
    names = [a[-2].split("=", 1)[1] for a in lines if a[3] == "pretrain"]
    assert len(set(names)) == len(names) and not (tmp_path / "logs").exists()  # printed, not run
    assert {n.rsplit("-s", 1)[1] for n in names[:16]} == {"0"}
    dro = subprocess.run([sys.executable, str(SCRIPT), "--preset", "cpu2", "--dry-run", "--best-learned",
                          "simclr-dro-global"], capture_output=True, text=True, timeout=60)
    assert dro.returncode == 0 and dro.stdout.startswith("# simclr-dcl-dro-global: not applicable, skipped")


# ---- round two's report on fake finished runs ---------------------------------------------------------

def _fake_run(out: Path, label: str, summary: dict, rankme: list) -> None:
    """What pretraining + knn + linear leave behind, as far as the report reads it."""
    d = out / label
    d.mkdir(parents=True)
    rows = [{"step": 10 * (i + 1), "epoch": float(i + 1), "online_knn/top1_k20_t0.07": 80.0, "online_rankme": v}
            for i, v in enumerate(rankme)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    diag = {"diag/alignment": 0.2, "diag/uniformity": -1.5}  # knn writes them; the study's compare plots them
    (d / "summary.json").write_text(json.dumps({"run_name": label, **diag, **summary}))


# setting: (kNN k=20, linear, RankMe) per seed 0, 1, 2
FAKE = {
    "simclr-fixed-0.2": ((84.0, 84.2, 84.4), (85.0, 85.2, 85.4), (40.0, 42.0, 44.0)),
    "simclr-conditional": ((83.8, 84.2, 84.3), (85.4, 85.5, 85.6), (50.0, 52.0, 54.0)),
    "simclr-learnable-log": ((84.5, 84.6, 84.7), (84.9, 85.0, 85.1), (30.0, 60.0, 30.0)),  # one high seed, mean 40
}


def test_report_names_the_rankme_pick_its_ranks_and_a_verdict_per_setting(tmp_path, capsys) -> None:
    for name, (knn, lin, rk) in FAKE.items():
        for seed in (0, 1, 2):
            # an earlier, higher RankMe (99) must not count: the final encoder's is the last one logged
            _fake_run(tmp_path, f"{name}-s{seed}", {K20: knn[seed], K200: knn[seed] - 2, LIN: lin[seed]},
                      [99.0, rk[seed]] if name == "simclr-fixed-0.2" else [rk[seed]])
    mod = _module()
    assert mod.main(["--preset", "cpu2", "--out", str(tmp_path), "--report-only", "--no-baselines", "--no-ood",
                     "--only", *FAKE, "simclr-adaptive"]) == 0  # adaptive: not started
    md = (tmp_path / "results.md").read_text()
    assert ("- RankMe (label-free: the highest mean final online_rankme over seeds, among 3 settings) would pick "
            "simclr-conditional (RankMe 52.00): rank 3 of 3 by kNN k=20 T=0.07 (84.10; best: simclr-learnable-log "
            "84.60), rank 1 of 3 by linear probe (85.50)\n") in md
    assert ("- learned τ modes by mean kNN k=20 T=0.07: simclr-learnable-log 84.60, simclr-conditional 84.10; the "
            "best two: `--best-learned simclr-learnable-log --second-learned simclr-conditional`\n") in md
    # Δ kNN: -0.2, 0, -0.1 (sd 0.1, t_2 = 4.303: ± 0.248); Δ linear: +0.4, +0.3, +0.2
    assert ("- simclr-conditional (seeds 0,1,2; paired on 0,1,2): kNN k=20 T=0.07 84.10 ± 0.26, Δ -0.10 "
            "[-0.35, +0.15] **no evidence**; linear probe 85.50 ± 0.10, Δ +0.30 [+0.05, +0.55] **better**\n") in md
    assert ("- simclr-fixed-0.2 (the reference; seeds 0,1,2): kNN k=20 T=0.07 84.20 ± 0.20; linear probe "
            "85.20 ± 0.20\n") in md
    assert "- simclr-learnable-log (seeds 0,1,2; paired on 0,1,2): kNN k=20 T=0.07 84.60 ± 0.10, Δ +0.40" in md
    assert "- simclr-adaptive: no seed evaluated yet\n" in md
    assert ("| simclr-conditional | 0,1,2 | 84.10 ± 0.26 | -0.10 [-0.35, +0.15] | 85.50 ± 0.10 | +0.30 [+0.05, +0.55] "
            "| no evidence / better | – |\n") in md  # the summary table: the same figures, one row a setting
    assert "| simclr-fixed-0.2 | 0,1,2 | 84.20 ± 0.20 | ref. | 85.20 ± 0.20 | ref. | ref. | – |\n" in md
    assert "simclr-adaptive |" not in md.split("Every figure:")[0]  # no seed: not in the summary
    assert md.index("The answer:") < md.index("The project's question") < md.index("Every figure:") < md.index("| run | seeds |")
    # against the best fixed τ (here the only one, fixed 0.2): the learned modes only
    assert "| simclr-conditional | -0.10 [-0.35, +0.15] no evidence (seeds 0,1,2) | +0.30 [+0.05, +0.55] better (seeds 0,1,2) |\n" in md
    assert "--best-learned not given" in md and "τ as an out-of-distribution score" not in md
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["rankme"][0].startswith("RankMe (label-free") and res["rows"][0]["online_rankme"] == 40.0
    assert {a["run"]: a["mean"]["online_rankme"] for a in res["aggregate"]} == {
        "simclr-fixed-0.2": 42.0, "simclr-conditional": 52.0, "simclr-learnable-log": 40.0, "simclr-adaptive": None}


def test_report_with_best_learned_has_the_part_b_table(tmp_path) -> None:
    moco = {"simclr-fixed-0.2": FAKE["simclr-fixed-0.2"], "simclr-conditional": FAKE["simclr-conditional"],
            "mocov2-fixed-0.2": ((83.0, 83.1, 83.2), (84.0, 84.0, 84.0), (30.0, 30.0, 30.0)),
            "mocov2-conditional": ((83.5, 83.4, 83.8), (84.1, 84.2, 84.3), (30.0, 30.0, 30.0))}
    for name, (knn, lin, rk) in moco.items():
        for seed in (0, 1, 2):
            _fake_run(tmp_path, f"{name}-s{seed}", {K20: knn[seed], K200: knn[seed] - 2, LIN: lin[seed]}, [rk[seed]])
    mod = _module()
    assert mod.main(["--preset", "cpu2", "--out", str(tmp_path), "--report-only", "--no-baselines", "--no-ood",
                     "--best-learned", "simclr-conditional", "--only", *list(moco)[:3]]) == 0  # + its derived runs
    md = (tmp_path / "results.md").read_text()
    part_b = md.split("Part B: simclr-conditional, the best learned mode")[1].split("Every figure:")[0]
    # MoCo v2: Δ kNN +0.5, +0.3, +0.6 against mocov2-fixed-0.2 (sd 0.153, t_2 = 4.303: ± 0.379); DCL: neither ran
    assert ("| mocov2-conditional | mocov2-fixed-0.2 | +0.47 [+0.09, +0.85] better (seeds 0,1,2) | +0.20 [-0.05, "
            "+0.45] no evidence (seeds 0,1,2) |") in part_b
    assert "| simclr-conditional | simclr-fixed-0.2 | -0.10 [-0.35, +0.15] no evidence (seeds 0,1,2) |" in part_b
    assert "simclr-dcl" not in part_b
    res = json.loads((tmp_path / "results.json").read_text())
    assert {(d["run"], d["reference"]) for d in res["by_objective"] if d["mean"] is not None} == {
        ("simclr-conditional", "simclr-fixed-0.2"), ("mocov2-conditional", "mocov2-fixed-0.2")}
    assert mod.main(["--preset", "cpu2", "--out", str(tmp_path), "--report-only", "--no-baselines", "--no-ood",
                     "--only", *list(moco)[:3]]) == 0  # without --best-learned: no part B
    assert "Part B" not in (tmp_path / "results.md").read_text()


def test_report_covers_every_evaluated_run_whichever_invocation_ran_it(tmp_path) -> None:
    for name, (knn, lin, rk) in FAKE.items():
        for seed in (0, 1, 2):
            _fake_run(tmp_path, f"{name}-s{seed}", {K20: knn[seed], K200: knn[seed] - 2, LIN: lin[seed]}, [rk[seed]])
            (tmp_path / f"{name}-s{seed}" / "eval").mkdir()
            (tmp_path / f"{name}-s{seed}" / "eval" / "knn.json").write_text("{}")  # what counts as evaluated
    (tmp_path / "simclr-fixed-0.5-s0").mkdir()  # still training in another invocation: no eval/knn.json
    (tmp_path / "simclr-fixed-0.5-s0" / "summary.json").write_text(json.dumps({"run_name": "x", K20: 1.0}))
    (tmp_path / "my-notes-s1").mkdir()  # not a setting of the study
    _fake_ood(tmp_path / "ood-simclr-conditional-s0" / "eval", 0.6, 0.9, 0.6)
    mod = _module()
    # this invocation's part: fixed 0.2 seed 0 only, without the OOD block
    assert mod.main(["--preset", "cpu2", "--out", str(tmp_path), "--report-only", "--no-baselines", "--no-ood",
                     "--only", "simclr-fixed-0.2", "--seeds", "0", "--spread-seeds"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["run"], r["seed"]) for r in res["rows"]] == [  # planned first, then the rest in RUNS order
        ("simclr-fixed-0.2", 0), ("simclr-fixed-0.2", 1), ("simclr-fixed-0.2", 2), ("simclr-learnable-log", 0),
        ("simclr-learnable-log", 1), ("simclr-learnable-log", 2), ("simclr-conditional", 0),
        ("simclr-conditional", 1), ("simclr-conditional", 2)]
    md = (tmp_path / "results.md").read_text()
    assert ("| simclr-conditional | 0,1,2 | 84.10 ± 0.26 | -0.10 [-0.35, +0.15] | 85.50 ± 0.10 | +0.30 [+0.05, +0.55] "
            "| no evidence / better | – |\n") in md  # paired on all three seeds of the reference, not only seed 0
    assert "simclr-fixed-0.5" not in md and "my-notes" not in md
    assert [r["run"] for r in res["ood"]["rows"]] == ["simclr-conditional"] and "| simclr-conditional | 0 | 0.600 |" in md
    compare = (tmp_path / "logs" / "compare.log").read_text()  # the comparison got every evaluated run too
    assert "simclr-conditional-s2" in compare and "simclr-fixed-0.5-s0" not in compare


def test_ood_record_reads_the_keys_the_ood_command_writes() -> None:
    import torch

    from simclr_tau.evaluation.ood import ood_report, train_error_report

    _module()
    tables = importlib.import_module("study_tables")  # the report's helpers, beside the script
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(40, 8, generator=g), torch.arange(40) % 2
    id_feats, ood_feats = torch.randn(10, 8, generator=g), torch.randn(6, 8, generator=g)
    report = ood_report(feats, labels, id_feats, labels[:10], ood_feats, 2, k=5, tau_id=torch.rand(10, generator=g),
                        tau_ood=torch.rand(6, generator=g))
    loo = train_error_report(feats, labels, 2, k=5, tau=torch.rand(40, generator=g))
    rec = tables.ood_record({**report, "train_leave_one_out": loo})
    assert all(rec[k] is not None for k, _ in tables.OOD_FIGURES)  # every column found under the name it is written
    assert rec["auroc_tau"] == report["auroc_tau"] and rec["train_auroc_tau_error"] == loo["auroc_tau_error"]


def _fake_ood(path: Path, tau, knn_dist: float, tau_train, reason=None) -> None:
    path.mkdir(parents=True)
    (path / "ood.json").write_text(json.dumps({
        "ood_classes": [8, 9], "ood_class_names": ["Bag", "Ankle boot"], "knn_top1_id": 90.0 + knn_dist,
        "auroc_knn_distance": knn_dist, "auroc_knn_distance_id_error": knn_dist - 0.2, "auroc_tau": tau,
        "auroc_tau_id_error": None if tau is None else tau - 0.1, "auroc_tau_reason": reason,
        "train_leave_one_out": {"auroc_knn_distance_error": 0.7, "auroc_tau_error": tau_train,
                                "auroc_tau_reason": None if tau_train is not None else reason}}))


def test_report_tabulates_the_ood_aurocs_per_setting(tmp_path, capsys) -> None:
    table_only = "n/a (τ_i exists only for training images)"
    for seed, (a, d) in enumerate(((0.6, 0.90), (0.7, 0.92), (0.8, 0.94))):
        _fake_ood(tmp_path / f"ood-simclr-conditional-s{seed}" / "eval", a, d, a)
        _fake_ood(tmp_path / f"ood-simclr-dro-per-sample-s{seed}" / "eval", None, d, 0.55 + 0.05 * seed, table_only)
        _fake_ood(tmp_path / f"ood-simclr-fixed-0.2-s{seed}" / "eval", None, d, None,
                  "temperature.mode=fixed: no per-sample τ")
    _fake_ood(tmp_path / "ood-simclr-conditional-dro-s1" / "eval", 0.3, 0.9, 0.4)  # one seed so far
    _fake_ood(tmp_path / "baselines" / "pixels-ood", None, 0.85, None, "no temperature head (pixels / random init)")
    mod = _module()
    assert mod.main(["--preset", "cpu2", "--out", str(tmp_path), "--report-only", "--only"]) == 0
    md = (tmp_path / "results.md").read_text()
    assert ("Held out as out-of-distribution: classes [8, 9] (Bag, Ankle boot); score: larger = more OOD / "
            "uncertain; mean ± std over seeds.") in md
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    # columns: AUROC τ / kNN dist for OOD, τ / kNN dist for ID kNN errors, τ / kNN dist for train errors, top-1
    assert rows["simclr-conditional"] == (
        "| simclr-conditional | 0,1,2 | 0.700 ± 0.100 | 0.920 ± 0.020 | 0.600 ± 0.100 | 0.720 ± 0.020 | "
        "0.700 ± 0.100 | 0.700 ± 0.000 | 90.92 ± 0.02 |")
    assert rows["simclr-dro-per-sample"] == (
        "| simclr-dro-per-sample | 0,1,2 | n/a | 0.920 ± 0.020 | n/a | 0.720 ± 0.020 | 0.600 ± 0.050 | "
        "0.700 ± 0.000 | 90.92 ± 0.02 |")
    assert rows["simclr-fixed-0.2"].startswith(
        "| simclr-fixed-0.2 | 0,1,2 | n/a | 0.920 ± 0.020 | n/a | 0.720 ± 0.020 | n/a |")
    assert rows["simclr-conditional-dro"].startswith("| simclr-conditional-dro | 1 | 0.300 | 0.900 | 0.200 | 0.700 |")
    assert rows["*raw pixels*"] == "| *raw pixels* | – |  | 0.850 |  | 0.650 |  | 0.700 | 90.85 |"
    assert f"- simclr-dro-per-sample, why τ is missing: {table_only}" in md
    assert "- simclr-fixed-0.2, why τ is missing: temperature.mode=fixed: no per-sample τ" in md
    ood = json.loads((tmp_path / "results.json").read_text())["ood"]
    assert [a["run"] for a in ood["aggregate"]] == [
        "simclr-conditional", "simclr-conditional-dro", "simclr-dro-per-sample", "simclr-fixed-0.2"]


def test_train_minutes_sum_every_logged_window_of_a_resumed_run() -> None:
    """(steps since the previous row) × batch / images/s summed over the log: a run resumed at step 60 (its log
    cut there and continued) counts both pieces; rows without a rate (online kNN) are skipped."""
    from simclr_tau.records.run_data import RunData

    mod = _module()
    rows = [{"step": 20, "train/images_per_s": 100.0}, {"step": 40, "train/images_per_s": 200.0},
            {"step": 40, "epoch": 1.0, "online_knn/top1_k20_t0.07": 80.0},
            {"step": 60, "train/images_per_s": 50.0},  # the piece before the interruption ends here
            {"step": 100, "train/images_per_s": 400.0}]  # after the resume
    r = RunData("x", "", {"train.batch_size": 10}, {}, rows)
    expected = (20 * 10 / 100 + 20 * 10 / 200 + 20 * 10 / 50 + 40 * 10 / 400) / 60
    assert mod.train_minutes(r) == pytest.approx(expected, rel=1e-12)
    assert mod.train_minutes(RunData("x", "", {}, {}, rows)) is None  # no batch size in the config
    assert mod.train_minutes(RunData("x", "", {"train.batch_size": 10}, {}, [])) is None


def test_pending_steps_skip_done_ones_and_a_pretraining_whose_evaluations_exist(tmp_path) -> None:
    mod = _module()
    enc, knn, lin = tmp_path / "encoder.safetensors", tmp_path / "knn.json", tmp_path / "linear.json"
    steps = [mod.Step(["pretrain"], enc, intermediate=True), mod.Step(["knn"], knn), mod.Step(["linear"], lin)]
    names = lambda: [s.cmd[0] for s in mod.pending_steps(steps)]  # noqa: E731
    assert names() == ["pretrain", "knn", "linear"]
    enc.write_text("x")
    assert names() == ["knn", "linear"]
    knn.write_text("{}")
    assert names() == ["linear"]
    lin.write_text("{}")
    assert names() == []
    enc.unlink()  # restored from an archive: evaluated, no encoder
    assert names() == []
    knn.unlink()  # one evaluation to redo: it needs the encoder, so pretraining runs again
    assert names() == ["pretrain", "knn"]
    assert [s.cmd[0] for s in mod.pending_steps([mod.Step(["compare"], None)])] == ["compare"]
    # independent steps (the pixel baselines): each runs while its own output is missing
    independent = [mod.Step(["knn"], knn), mod.Step(["linear"], lin)]
    assert [s.cmd[0] for s in mod.pending_steps(independent)] == ["knn"]


def _study_files(out: Path, label: str, text: str) -> None:  # a run directory's kinds of files, big and small
    run = out / label
    (run / "eval").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "eval/knn.json", "eval/linear.json"):
        (run / name).write_text(f"{label} {name} {text}")
    (run / "encoder.safetensors").write_bytes(b"weights")
    (run / "checkpoints" / "step_00000002.pt").write_bytes(b"ckpt")
    (run / "eval" / "features.npy").write_bytes(b"cache")
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / f"{label}.log").write_text(f"log of {label}")
    with open(out / "logs" / "timings.jsonl", "a") as f:
        f.write(json.dumps({"label": label, "step": "pretrain", "seconds": 1.0, "rc": 0}) + "\n")


def test_archive_keeps_the_small_files_and_restore_brings_back_only_missing_runs(tmp_path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    import study_archive as sa

    out, arch = tmp_path / "study", tmp_path / "archive"
    _study_files(out, "a-s0", "v1")
    _study_files(out, "b-s0", "v1")
    (out / "baselines" / "pixels").mkdir(parents=True)
    (out / "baselines" / "pixels" / "knn.json").write_text("pixels")
    copied = sa.archive(out, arch, ["a-s0", "b-s0"])
    assert sorted(map(str, copied)) == sorted([
        "a-s0/config.yaml", "a-s0/metrics.jsonl", "a-s0/summary.json", "a-s0/eval/knn.json", "a-s0/eval/linear.json",
        "logs/a-s0.log", "b-s0/config.yaml", "b-s0/metrics.jsonl", "b-s0/summary.json", "b-s0/eval/knn.json",
        "b-s0/eval/linear.json", "logs/b-s0.log", "baselines/pixels/knn.json"])
    assert len((arch / "logs" / "timings.jsonl").read_text().splitlines()) == 2
    assert sa.archive(out, arch, ["a-s0", "b-s0"]) == []  # unchanged files are not copied again
    (out / "a-s0" / "summary.json").write_text("a-s0 summary v2")  # a newer result replaces the archived one
    assert sa.archive(out, arch, ["a-s0"]) == [Path("a-s0/summary.json")]
    assert (arch / "a-s0" / "summary.json").read_text() == "a-s0 summary v2"

    fresh = tmp_path / "fresh"  # a new machine: everything comes back but the weights
    (fresh / "b-s0").mkdir(parents=True)  # ... except a run this machine has started itself: left alone
    (fresh / "b-s0" / "metrics.jsonl").write_text("b mid-run")
    (fresh / "logs").mkdir()
    (fresh / "logs" / "timings.jsonl").write_text(json.dumps({"label": "c-s0", "step": "knn", "seconds": 2.0, "rc": 0}) + "\n")
    restored = sa.restore(arch, fresh)
    assert sorted(p.parts[0] for p in restored) == ["a-s0"] * 5 + ["baselines", "logs", "logs"]
    assert (fresh / "a-s0" / "summary.json").read_text() == "a-s0 summary v2"
    assert not (fresh / "a-s0" / "encoder.safetensors").exists() and not (fresh / "a-s0" / "checkpoints").exists()
    assert (fresh / "b-s0" / "metrics.jsonl").read_text() == "b mid-run" and not (fresh / "b-s0" / "summary.json").exists()
    labels = [json.loads(line)["label"] for line in (fresh / "logs" / "timings.jsonl").read_text().splitlines()]
    assert labels == ["c-s0", "a-s0", "b-s0"]  # merged line by line, the machine's own first
    assert sa.restore(arch, fresh) == [] and sa.restore(tmp_path / "none", fresh) == []


def test_part_b_pairs_the_best_learned_mode_with_each_objectives_own_fixed_tau() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    import study_tables as st

    mod = _module()
    assert mod.objective_pairs(None) == []
    assert mod.objective_pairs("simclr-learnable-log-bounded") == [
        ("simclr-learnable-log-bounded", "simclr-fixed-0.2"),
        ("simclr-dcl-learnable-log-bounded", "simclr-dcl-fixed-0.2"),
        ("mocov2-learnable-log-bounded", "mocov2-fixed-0.2")]
    assert mod.objective_pairs("simclr-dro-per-sample") == [  # a dro mode has no DCL variant
        ("simclr-dro-per-sample", "simclr-fixed-0.2"), ("mocov2-dro-per-sample", "mocov2-fixed-0.2")]
    # the preset's reference (cpu2-long: the recipe row) for the mode's own pair; each objective keeps its own
    assert mod.objective_pairs("simclr-learnable-log-bounded-outbn", "simclr-fixed-0.2-outbn")[0] == (
        "simclr-learnable-log-bounded-outbn", "simclr-fixed-0.2-outbn")
    K, LIN = "knn/top1_k20_t0.07", "linear/test_top1"
    figures = {  # setting: (kNN per seed, linear per seed)
        "simclr-fixed-0.2": ((86.3, 86.3, 86.3), (88.7, 88.7, 88.7)),
        "simclr-learnable-log-bounded": ((86.7, 86.8, 86.6), (88.5, 88.5, 88.5)),
        "simclr-dcl-fixed-0.2": ((86.4, 86.5, 86.6), (88.8, 88.9, 89.0)),
        "simclr-dcl-learnable-log-bounded": ((86.4, 86.4, 86.4), (88.8, 88.8, 88.8)),
        "mocov2-fixed-0.2": ((85.2, 85.3, 85.4), (87.2, 87.2, 87.2)),
        "mocov2-learnable-log-bounded": ((86.0, 86.2), (87.0, 87.1)),  # seed 2 not run yet
    }
    rows = [{"run": name, "seed": s, K: knn[s], LIN: lin[s]} for name, (knn, lin) in figures.items()
            for s in range(len(knn))]
    diffs = st.vs_references(rows, [K, LIN], mod.objective_pairs("simclr-learnable-log-bounded"))
    d = {(e["run"], e["metric"]): e for e in diffs}
    assert {e["reference"] for e in diffs if e["run"].startswith("mocov2-")} == {"mocov2-fixed-0.2"}
    simclr = d[("simclr-learnable-log-bounded", K)]  # Δ 0.4, 0.5, 0.3 against simclr-fixed-0.2, not DCL's
    assert math.isclose(simclr["mean"], 0.4) and simclr["verdict"] == "better"
    assert math.isclose(simclr["hi"], 0.4 + 4.303 * 0.1 / 3 ** 0.5)
    dcl = d[("simclr-dcl-learnable-log-bounded", K)]  # Δ 0, -0.1, -0.2 against DCL's own fixed 0.2
    assert math.isclose(dcl["mean"], -0.1) and dcl["verdict"] == "no evidence" and dcl["seeds"] == [0, 1, 2]
    moco = d[("mocov2-learnable-log-bounded", K)]  # Δ 0.8, 0.9 on seeds 0, 1: t_1 = 12.706
    assert moco["seeds"] == [0, 1] and math.isclose(moco["lo"], 0.85 - 12.706 * statistics.stdev([0.8, 0.9]) / 2 ** 0.5)
    table = st.vs_references_table(diffs, [K, LIN])
    assert table.splitlines()[0] == "| setting | against | Δ kNN k=20 T=0.07 (seeds) | Δ linear probe (seeds) |"
    assert table.splitlines()[3] == ("| simclr-dcl-learnable-log-bounded | simclr-dcl-fixed-0.2 | -0.10 [-0.35, +0.15] "
                                     "no evidence (seeds 0,1,2) | -0.10 [-0.35, +0.15] no evidence (seeds 0,1,2) |")
    rows = [r for r in rows if not r["run"].startswith("mocov2-learnable")]  # not started: no row
    assert len(st.vs_references_table(st.vs_references(rows, [K, LIN], mod.objective_pairs(
        "simclr-learnable-log-bounded")), [K, LIN]).splitlines()) == 4


def test_learned_taus_are_paired_against_the_best_fixed_tau_of_each_metric() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    import study_tables as st

    K, LIN = "knn/top1_k20_t0.07", "linear/test_top1"
    figures = {  # setting: (kNN per seed, linear per seed)
        "simclr-fixed-0.1": ((86.7, 86.5, 86.6), (88.9, 88.2, 88.5)),  # best fixed by kNN (86.6)
        "simclr-fixed-0.2": ((86.3, 86.35, 86.35), (88.6, 88.8, 88.6)),  # best fixed by linear (88.67)
        "simclr-fixed-0.2-outbn": ((90.0, 90.0, 90.0), (95.0, 95.0, 95.0)),  # a recipe row, not a fixed τ
        "simclr-learnable-log": ((87.2, 86.9, 87.1), (88.6, 88.6, 88.6)),
        "simclr-conditional": ((), ()),  # not evaluated yet
    }
    rows = [{"run": name, "seed": s, K: knn[s], LIN: lin[s]} for name, (knn, lin) in figures.items()
            for s in range(len(knn))] + [{"run": "simclr-conditional", "seed": 0}]
    fixed = _module().FIXED_TAU  # the study's constants: the -outbn recipe row, DCL and MoCo v2 are not among them
    assert fixed == ["simclr-fixed-0.05", "simclr-fixed-0.07", "simclr-fixed-0.1", "simclr-fixed-0.2", "simclr-fixed-0.5"]
    agg = st.aggregate(rows)
    assert st.best_fixed(agg, K, fixed) == "simclr-fixed-0.1" and st.best_fixed(agg, LIN, fixed) == "simclr-fixed-0.2"
    assert st.best_fixed(agg, "knn/top1_k200_t0.1", fixed) is None
    diffs = st.vs_best_fixed(rows, agg, [K, LIN], ["simclr-learnable-log", "simclr-conditional"], fixed)
    d = {(e["run"], e["metric"]): e for e in diffs}
    knn = d[("simclr-learnable-log", K)]  # Δ 0.5, 0.4, 0.5: mean 0.4667, sd 0.0577, t_2 = 4.303 → ± 0.1434
    assert knn["reference"] == "simclr-fixed-0.1" and knn["verdict"] == "better"
    assert math.isclose(knn["mean"], 1.4 / 3) and math.isclose(knn["lo"], 1.4 / 3 - 4.303 * (1 / 300) ** 0.5 / 3 ** 0.5)
    lin = d[("simclr-learnable-log", LIN)]  # Δ 0, -0.2, 0 against fixed 0.2: mean -0.0667, sd 0.1155 → ± 0.2869
    assert lin["reference"] == "simclr-fixed-0.2" and lin["verdict"] == "no evidence"
    assert math.isclose(lin["hi"], -0.2 / 3 + 4.303 * statistics.stdev([0.0, -0.2, 0.0]) / 3 ** 0.5, abs_tol=1e-9)
    table = st.vs_best_fixed_table(diffs, [K, LIN])
    assert table.splitlines()[0] == ("| learned τ | Δ kNN k=20 T=0.07 vs simclr-fixed-0.1 (seeds) | Δ linear probe vs "
                                     "simclr-fixed-0.2 (seeds) |")
    assert table.splitlines()[2] == ("| simclr-learnable-log | +0.47 [+0.32, +0.61] better (seeds 0,1,2) | -0.07 [-0.35, "
                                     "+0.22] no evidence (seeds 0,1,2) |")
    rows = [r for r in rows if (r["run"], r["seed"]) != ("simclr-fixed-0.1", 2)]  # the kNN reference lacks seed 2
    diffs = st.vs_best_fixed(rows, st.aggregate(rows), [K, LIN], ["simclr-learnable-log"], fixed)
    assert "better (seeds 0,1,2) |" not in st.vs_best_fixed_table(diffs, [K, LIN])
    assert st.vs_best_fixed_table(diffs, [K, LIN]).splitlines()[2].count("(seeds 0,1)") == 1  # kNN 0,1; linear 0,1,2
    rows = [r for r in rows if r["run"] != "simclr-learnable-log" or r["seed"] == 0]  # one common seed: no interval
    diffs = st.vs_best_fixed(rows, st.aggregate(rows), [K, LIN], ["simclr-learnable-log"], fixed)
    assert st.vs_best_fixed_table(diffs, [K, LIN]).splitlines()[2] == (
        "| simclr-learnable-log | +0.50 (seed 0 only: no interval) | +0.00 (seed 0 only: no interval) |")
    assert len(table.splitlines()) == 3  # the setting without an evaluated seed has no row
