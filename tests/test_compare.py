"""``simclr-tau compare`` on real tiny runs (fixed / learnable / conditional τ): the table equals the runs'
records, the differing config keys are found, the PNGs and the self-contained HTML are written; the W&B path
against a fake ``wandb.Api`` (the cloud is unreachable here) gives the same table; bad input is a one-line
error with exit status 2; scripts/tau_sweep.py plans (and runs) the six τ settings."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simclr_tau.records.compare import compare
from simclr_tau.records.run_data import RunData, load_run_dir
from simclr_tau.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")
COMMON = ["train.epochs=2", "eval.online_knn_every=1", "eval.knn_k=[5]", "eval.knn_t=[0.1]", "wandb.enabled=false"]
MODES = {
    "tau-fixed": ["temperature.mode=fixed", "temperature.init=0.2"],
    "tau-learnable": ["temperature.mode=learnable", "optim.lr=2.0"],
    "tau-conditional": ["temperature.mode=conditional", "optim.lr=2.0"],
}
KNN = "knn/top1_k5_t0.1"  # the offline evaluation (simclr-tau knn)
ONLINE_KNN = "online_knn/top1_k5_t0.1"  # logged during pretraining


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Three tiny pretraining runs; kNN evaluation on the first, the linear probe on the first two."""
    from simclr_tau.evaluation.cli import knn_main, linear_main
    from simclr_tau.train.pretrain import run

    root = tmp_path_factory.mktemp("compare_runs")
    dirs = [run(load_config(TINY, [*COMMON, *ov, f"train.output_dir={root}", f"train.run_name={name}"])).run_dir
            for name, ov in MODES.items()]
    knn_main([str(dirs[0]), "--k", "5", "--t", "0.1", "--no-diagnostics", "--no-progress"])
    for d in dirs[:2]:
        linear_main([str(d), "--no-progress"])
    return dirs


@pytest.fixture(scope="module")
def result(runs, tmp_path_factory):
    from simclr_tau.records.compare import main

    out = tmp_path_factory.mktemp("compare_out")
    return main([*map(str, runs), "--out", str(out)])


def test_table_holds_the_numbers_of_the_run_records(runs, result, capsys) -> None:
    assert [r.name for r in result.runs] == list(MODES)
    col = {h: i for i, h in enumerate(result.headers)}
    for run_dir, raw in zip(runs, result.raw):
        log, s = rows(run_dir), summary(run_dir)
        train = [r for r in log if "train/loss" in r]
        assert raw[col["run"]] == s["run_name"] == run_dir.name
        assert raw[col["final loss"]] == s["final/train_loss"] == train[-1]["train/loss"]
        tau_key = "train/tau_mean" if "conditional" in run_dir.name else "train/tau"
        assert raw[col["final τ"]] == train[-1][tau_key]
        # kNN: the offline evaluation where it ran (summary.json); online kNN: its last row
        online = [r[ONLINE_KNN] for r in log if ONLINE_KNN in r]
        assert len(online) == 2  # one per epoch
        assert raw[col["kNN k=5 T=0.1 top-1"]] == s.get(KNN)
        assert raw[col["online kNN k=5 T=0.1 top-1"]] == s[ONLINE_KNN] == online[-1]
        assert raw[col["linear top-1"]] == s.get("linear/test_top1")  # None where the probe did not run
        for key, header in (("calib/ece_before", "ECE before (%)"), ("calib/ece_after", "ECE after (%)")):
            assert raw[col[header]] == (None if s.get(key) is None else pytest.approx(100 * s[key]))  # in %
    assert result.raw[2][col["linear top-1"]] is None
    assert result.raw[0][col["τ mode"]] == "fixed" and result.raw[2][col["τ mode"]] == "conditional"


def test_config_differences_name_the_tau_mode(result) -> None:
    assert result.diff["temperature.mode"] == ["fixed", "learnable", "conditional"]
    assert result.diff["optim.lr"] == [0.1, 2.0, 2.0]
    assert "train.run_name" not in result.diff and "train.output_dir" not in result.diff
    assert "data.name" not in result.diff  # the same in every run


def test_printed_tables(runs, tmp_path, capsys) -> None:
    from simclr_tau.records.compare import main

    main([*map(str, runs), "--out", str(tmp_path), "--no-plots"])
    out = capsys.readouterr().out
    table, diff = out.split("config differences")
    for name in MODES:
        assert name in table and name in diff.splitlines()[1]  # a row each; a column each
    assert re.search(r"temperature\.mode\s+fixed\s+learnable\s+conditional", diff)
    s = summary(runs[0])
    assert f"{s['final/train_loss']:.4g}" in table and f"{s['linear/test_top1']:.4g}" in table


def test_pngs_show_one_line_per_run(result) -> None:
    import matplotlib.image as mpimg
    from matplotlib import colormaps

    images = dict(result.images)
    assert set(images) == {"kNN top-1 vs epoch", "loss vs step", "τ vs step", "final metrics"}
    assert result.notes == []
    for title, path in images.items():
        assert path.stat().st_size > 15_000, title
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] >= 400 and img.shape[1] >= 500, (title, img.shape)
        # every run's colour (tab10 i) is drawn: its line / bar / legend entry
        rgb = img[..., :3]
        for i in range(len(MODES)):
            color = colormaps["tab10"](i)[:3]
            near = (abs(rgb - color) < 0.05).all(axis=-1).sum()
            assert near > 50, (title, i, near)


def test_html_report_is_self_contained(result) -> None:
    html = result.html.read_text()
    for name in MODES:
        assert name in html
    uris = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(uris) == len(result.images) == 4
    assert all(base64.b64decode(u)[:8] == b"\x89PNG\r\n\x1a\n" for u in uris)
    assert "temperature.mode" in html and "<table>" in html
    assert not re.search(r"(src|href)=['\"](?!data:)", html)  # nothing outside the file


def test_knn_plot_is_skipped_with_a_note_without_online_knn(tmp_path) -> None:
    runs = [RunData(f"r{i}", "mem", {"temperature.mode": m}, {"train/loss": 1.0 + i},
                    [{"step": s, "epoch": s / 2, "train/loss": 3.0 - s * 0.1 * (i + 1), "train/tau": 0.1 * (i + 1)}
                     for s in range(1, 6)]) for i, m in enumerate(["fixed", "learnable"])]
    comp = compare(runs, tmp_path, echo=False)
    assert not (tmp_path / "knn_vs_epoch.png").exists()
    assert any(n.startswith("kNN top-1 vs epoch: skipped") and "eval.online_knn_every" in n for n in comp.notes)
    assert "skipped" in comp.html.read_text()


# ---- W&B public API, against a fake at the boundary -----------------------------------------------------

class FakeWandbRun:
    """What the tests need of ``wandb.apis.public.Run``: name, id, config (nested), summary, history."""

    def __init__(self, run_dir: Path, tags: list[str]) -> None:
        s = summary(run_dir)
        self.name, self.id, self.tags = s["run_name"], f"id-{s['run_name']}", tags
        self.config = {**yaml.safe_load((run_dir / "config.yaml").read_text()), "_wandb": {"cli_version": "0.31"}}
        self._rows = rows(run_dir)
        # like W&B: the last logged value of every key (step and epoch too), overlaid by summary updates
        self.summary = {k: v for r in self._rows for k, v in r.items()}
        self.summary.update({k: v for k, v in s.items() if k != "config"})
        self.summary.update({"_step": 99, "train/tau_hist": {"_type": "histogram", "values": [1, 2]}})
        self.scans: list[list[str]] = []

    def scan_history(self, keys=None, page_size=1000, min_step=None, max_step=None):
        self.scans.append(list(keys))
        return iter([{k: r[k] for k in keys} for r in self._rows if all(k in r for k in keys)])

    def history(self, samples=500, keys=None, x_axis="_step", pandas=True, stream="default"):
        return list(self.scan_history(keys))


def _match(run: FakeWandbRun, flt: dict) -> bool:
    """The subset of the W&B (MongoDB-style) filter language the tests use."""
    if "$and" in flt:
        return all(_match(run, f) for f in flt["$and"])
    (key, want), = flt.items()
    if key == "tags":
        return any(t in run.tags for t in want["$in"])
    node = run.config
    for part in key.split(".")[1:]:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node == want


class FakeWandbApi:
    """Stands in for ``wandb.Api`` (no network here): records the query, filters like the server."""

    calls: list = []
    runs_by_path: dict = {}

    def __init__(self, overrides=None, timeout=None, api_key=None) -> None:
        pass

    def runs(self, path=None, filters=None, order="+created_at", per_page=50, include_sweeps=False, lazy=True):
        FakeWandbApi.calls.append((path, filters))
        return [r for r in FakeWandbApi.runs_by_path.get(path, []) if not filters or _match(r, filters)]


@pytest.fixture
def fake_wandb_api(monkeypatch, runs):
    import wandb

    FakeWandbApi.calls = []
    FakeWandbApi.runs_by_path = {"team/tau-study": [FakeWandbRun(d, ["dataset:synthetic", f"tau_mode:{n}"])
                                                    for d, n in zip(runs, ["fixed", "learnable", "conditional"])]}
    monkeypatch.setattr(wandb, "Api", FakeWandbApi)
    return FakeWandbApi


def test_wandb_path_gives_the_same_table_as_the_local_records(fake_wandb_api, result, tmp_path) -> None:
    from simclr_tau.records.compare import main

    comp = main(["--wandb", "team/tau-study", "--out", str(tmp_path)])
    assert fake_wandb_api.calls == [("team/tau-study", None)]
    assert comp.headers == result.headers
    assert comp.raw == result.raw  # same names, losses, τ, kNN, linear, ECE
    assert comp.diff == result.diff
    assert [r.source for r in comp.runs] == [f"wandb:team/tau-study/id-{n}" for n in MODES]
    assert {t for t, _ in comp.images} == {"kNN top-1 vs epoch", "loss vs step", "τ vs step", "final metrics"}
    # history came from unsampled scans of the plotted keys, τ band included
    scans = fake_wandb_api.runs_by_path["team/tau-study"][2].scans
    assert ["step", "train/tau_mean", "train/tau_min", "train/tau_max", "epoch"] in scans


def test_wandb_filters_are_passed_through(fake_wandb_api, tmp_path) -> None:
    from simclr_tau.records.compare import main

    comp = main(["--wandb", "team/tau-study", "--filter", "temperature.mode=learnable", "--filter",
                 "tags=dataset:synthetic", "--out", str(tmp_path), "--no-plots"])
    assert fake_wandb_api.calls == [("team/tau-study", {"$and": [{"config.temperature.mode": "learnable"},
                                                                 {"tags": {"$in": ["dataset:synthetic"]}}]})]
    assert [r.name for r in comp.runs] == ["tau-learnable"]
    comp = main(["--wandb", "team/tau-study", "--filter", "temperature.init=0.2", "--out", str(tmp_path), "--no-plots"])
    assert fake_wandb_api.calls[-1] == ("team/tau-study", {"config.temperature.init": 0.2})  # a number, not "0.2"
    assert [r.name for r in comp.runs] == ["tau-fixed"]


def test_wandb_errors_are_one_line(fake_wandb_api, monkeypatch, tmp_path, capsys) -> None:
    from simclr_tau.cli import main

    for args, expected in [(["--wandb", "team/tau-study", "--filter", "temperature.mode=scheduled"], "has no runs matching"),
                           (["--wandb", "team/other"], "has no runs"),
                           (["--wandb", "a/b/c"], "expected ENTITY/PROJECT")]:
        _expect_exit_2(capsys, main, ["compare", *args, "--out", str(tmp_path)], expected)

    def unreachable(self, *a, **k):
        raise ConnectionError("Max retries exceeded with url: https://api.wandb.ai/graphql\nmore")

    monkeypatch.setattr(FakeWandbApi, "runs", unreachable)
    _expect_exit_2(capsys, main, ["compare", "--wandb", "team/tau-study", "--out", str(tmp_path)],
                   "W&B API: cannot read runs of team/tau-study (ConnectionError")


# ---- bad input ----------------------------------------------------------------------------------------

def _expect_exit_2(capsys, fn, argv, expected: str) -> None:
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err


def _write_run(d: Path, metrics: dict) -> Path:
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"run_name": d.name, "step": 4, **metrics}))
    return d


def test_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, runs) -> None:
    from simclr_tau.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a run")
    a = _write_run(tmp_path / "a", {"train/loss": 1.0})
    b = _write_run(tmp_path / "b", {"linear/test_top1": 50.0})
    cases = [
        ([str(empty)], f"{empty}: not a run directory (no metrics.jsonl or summary.json)"),
        ([str(tmp_path / "missing")], "no such run directory"),
        ([str(runs[0] / "metrics.jsonl")], "not a run directory"),
        ([str(a), str(b)], "no metric in common (a: train/loss; b: linear/test_top1)"),
        ([], "nothing to compare"),
        ([str(runs[0]), "--filter", "temperature.mode=fixed"], "--filter applies to --wandb"),
        ([str(runs[0]), "--metric", "diag/nothing"], "--metric diag/nothing: no run has it"),
    ]
    for args, expected in cases:
        _expect_exit_2(capsys, main, ["compare", *args, "--out", str(tmp_path / "out")], expected)
    (a / "summary.json").write_text("{not json")
    _expect_exit_2(capsys, main, ["compare", str(a)], "summary.json: invalid JSON")


def test_console_script_reports_a_non_run_directory_without_traceback(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "simclr_tau", "compare", str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "not a run directory" in proc.stderr


def test_a_directory_of_runs_stands_for_its_runs(runs, tmp_path) -> None:
    from simclr_tau.records.run_data import expand_run_dirs

    assert sorted(expand_run_dirs([str(runs[0].parent)])) == sorted(runs)
    assert load_run_dir(runs[0]).name == "tau-fixed"


def test_a_torn_last_metrics_line_is_ignored(runs, tmp_path) -> None:
    import shutil

    d = tmp_path / "killed"
    shutil.copytree(runs[1], d)
    (d / "summary.json").unlink()  # a run killed mid-write: no summary yet, half a line at the end
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "epoch": 2.25, "train/lo')
    r = load_run_dir(d)
    assert r.name == "killed" and r.final["train/loss"] == rows(runs[1])[-2]["train/loss"]
    assert r.config["temperature.mode"] == "learnable"  # from config.yaml


# ---- scripts/tau_sweep.py -------------------------------------------------------------------------------

def test_tau_sweep_dry_run_plans_six_settings_then_the_comparison(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "tau_sweep.py"), "train.epochs=1",
                           f"train.output_dir={tmp_path}", "--name", "sw", "--dry-run"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    pretrain = [line.split() for line in lines if " pretrain " in line]
    assert len(pretrain) == 6 and sum(" knn " in line for line in lines) == 6
    assert lines[-1].split()[3:] == ["compare", *[str(tmp_path / f"sw-{s}") for s in
                                                  ("fixed-0.07", "fixed-0.2", "fixed-0.5", "learnable", "conditional",
                                                   "cosine")], "--out", str(tmp_path / "sw-compare")]
    taus = []
    for argv in pretrain:
        i = argv.index("pretrain")
        cfg = load_config(REPO / argv[i + 1], argv[i + 2:])  # every setting is a valid config
        assert cfg.train.epochs == 1 and cfg.train.output_dir == str(tmp_path)
        t = cfg.temperature
        taus.append((t.mode, t.init) if t.mode != "scheduled" else (t.schedule.kind, t.schedule.start, t.schedule.end))
    assert taus == [("fixed", 0.07), ("fixed", 0.2), ("fixed", 0.5), ("learnable", 0.1), ("conditional", 0.1),
                    ("cosine", 0.5, 0.07)]


@pytest.mark.slow
def test_tau_sweep_runs_and_compares(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "tau_sweep.py"), TINY, "train.max_steps=2", "eval.knn_k=[5]", "eval.knn_t=[0.1]",
                           f"train.output_dir={tmp_path}", "--name", "sw", "--only", "fixed-0.07", "cosine"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for s in ("fixed-0.07", "cosine"):
        assert (tmp_path / f"sw-{s}" / "eval" / "knn.json").is_file()
    report = (tmp_path / "sw-compare" / "report.html").read_text()
    assert "sw-fixed-0.07" in report and "sw-cosine" in report and "scheduled (cosine)" in report


def test_tau_axis_turns_logarithmic_when_taus_span_more_than_a_decade() -> None:
    from simclr_tau.records.plots import tau_axis_scale

    assert tau_axis_scale([0.07, 0.2, 0.5]) == "linear"
    assert tau_axis_scale([0.001, 0.2, 8.0]) == "log"  # a relu-parametrized τ at its floor next to fixed ones
    assert tau_axis_scale([0.05, 0.6]) == "log" and tau_axis_scale([0.1, 1.0]) == "linear"


def test_final_metrics_axis_fits_the_values_instead_of_starting_at_zero(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from simclr_tau.records.run_data import RunData
    from simclr_tau.records.plots import plot_final_metrics, value_limits

    lo, hi = value_limits([83.52, 84.26, 83.84])
    assert lo == pytest.approx(83.52 - 0.12 * 0.74) and hi == pytest.approx(84.26 + 0.12 * 0.74)
    assert value_limits([-2.35, -1.9]) == pytest.approx((-2.35 - 0.054, -1.9 + 0.054))  # negative metrics too
    assert value_limits([85.0]) == pytest.approx((80.75, 89.25)) and value_limits([0.0]) == (-1.0, 1.0)
    runs = [RunData(name=f"r{i}", source="x", config={}, final={"knn/top1_k20_t0.07": v, "tau": 0.2})
            for i, v in enumerate([83.5, 84.3, float("nan")])]
    path = plot_final_metrics(runs, [("knn/top1_k20_t0.07", "kNN"), ("linear/test_top1", "absent")], tmp_path / "f.png")
    assert path is not None and imread(path).shape[0] > 100
    assert plot_final_metrics(runs, [("linear/test_top1", "absent")], tmp_path / "g.png") is None
    nan_only = [RunData(name="n", source="x", config={}, final={"calib/ece_after": float("nan")})]
    assert plot_final_metrics(nan_only, [("calib/ece_after", "ECE")], tmp_path / "h.png") is None  # no empty panel


def test_tau_band_prefers_the_table_quantiles_of_a_per_sample_tau(tmp_path: Path) -> None:
    from simclr_tau.records.plots import plot_tau, tau_band
    from simclr_tau.records.run_data import RunData

    table = RunData("dro", "x", {}, {}, [
        {"step": s, "train/tau_mean": 0.2, "train/tau_min": 0.1, "train/tau_max": 0.3,
         "train/tau_p1": 0.05 + s / 100, "train/tau_p50": 0.2 + s / 100, "train/tau_p99": 0.6} for s in (1, 2, 3)])
    steps, mid, lo, hi, what = tau_band(table)
    assert steps == [1, 2, 3] and mid == pytest.approx([0.21, 0.22, 0.23]) and lo == pytest.approx([0.06, 0.07, 0.08])
    assert hi == [0.6] * 3 and "p1–p99" in what
    batch = RunData("cond", "x", {}, {}, [{"step": 1, "train/tau_mean": 0.2, "train/tau_min": 0.1, "train/tau_max": 0.3},
                                          {"step": 2, "train/tau_mean": 0.25}])  # a row without its band
    steps, mid, lo, hi, what = tau_band(batch)
    assert steps == [1, 2] and mid == [0.2, 0.25] and lo is None and hi is None and "batch mean" in what
    assert tau_band(RunData("fixed", "x", {}, {}, [{"step": 1, "train/tau": 0.2}])) is None
    assert plot_tau([table, batch], tmp_path / "tau.png").stat().st_size > 1000


def test_distillation_temperatures_show_in_the_tau_column_and_plot(tmp_path: Path) -> None:
    """SEED logs train/tau_s and train/tau_t, KD train/T: each is named in the τ column and drawn (issue 19)."""
    from simclr_tau.records.plots import plot_tau
    from simclr_tau.records.tables import metric_table

    seed = RunData("seed", "x", {"train.method": "seed"}, {"train/tau_s": 0.1, "train/tau_t": 0.05, "train/loss": 1.0},
                   [{"step": s, "train/tau_s": 0.1, "train/tau_t": 0.05} for s in (1, 2)])
    kd = RunData("kd", "x", {"train.method": "kd"}, {"train/T_mean": 4.0, "train/T_min": 3.0, "train/T_max": 5.0},
                 [{"step": s, "train/T_mean": 4.0, "train/T_min": 3.0, "train/T_max": 5.0} for s in (1, 2)])
    headers, raw, text = metric_table([seed, kd])
    col = headers.index("final τ")
    assert text[0][col] == "student τ 0.1, teacher τ 0.05" and raw[0][col] == 0.1
    assert text[1][col] == "KD T 4 (3–5)" and raw[1][col] == 4.0
    assert plot_tau([seed, kd], tmp_path / "tau.png") is not None  # was skipped: no train/tau


def _study_run(d: Path, dataset: str, tau: str, knn: float, ece: float) -> Path:
    d.mkdir(parents=True)
    cfg = {"data.name": dataset, "model.backbone": "resnet18", "train.method": "simclr", "train.epochs": 10,
           "train.batch_size": 256, "train.seed": 0, "temperature.mode": tau}
    (d / "summary.json").write_text(json.dumps({"run_name": d.name, "config": cfg, KNN: knn, "calib/ece_after": ece,
                                                "linear/test_top1": knn + 1}))
    return d


def test_report_states_the_setup_marks_the_best_and_warns_on_mixed_datasets(tmp_path: Path, capsys) -> None:
    from simclr_tau.records.compare import main

    a = _study_run(tmp_path / "a", "fashion_mnist", "fixed", 80.0, 0.05)
    b = _study_run(tmp_path / "a-very-long-run-name-with-many-parts-learnable", "fashion_mnist", "learnable", 82.5, 0.02)
    comp = main([str(a), str(b), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert "setup: dataset fashion_mnist, backbone resnet18, method simclr, epochs 10, batch 256, seed 0; " \
           "differing: temperature.mode" in out and "warning" not in out
    col = {h: i for i, h in enumerate(comp.headers)}
    assert comp.text[1][col["kNN k=5 T=0.1 top-1"]] == "82.5 ★" and comp.text[0][col["kNN k=5 T=0.1 top-1"]] == "80"
    assert comp.text[1][col["ECE after (%)"]] == "2 ★" and comp.raw[0][col["ECE after (%)"]] == pytest.approx(5.0)
    page = comp.html.read_text()
    assert "<td><b>82.5 ★</b></td>" in page and "table class='sortable'" in page and "addEventListener" in page
    assert "<div class='scroll'>" in page and "ECE in %" in page and "setup: dataset fashion_mnist" in page

    c = _study_run(tmp_path / "c", "cifar10", "fixed", 60.0, 0.1)
    comp = main([str(a), str(c), "--out", str(tmp_path / "mixed")])
    out = capsys.readouterr().out
    assert "warning: runs of different datasets are mixed (cifar10, fashion_mnist)" in out
    assert "class='warning'>warning: runs of different datasets are mixed" in comp.html.read_text()
    assert "differing: dataset\n" in out  # a and c differ only in their dataset


def test_baselines_are_marked_rows_of_the_table_and_the_report(runs, tmp_path, capsys) -> None:
    """Raw pixels (`knn pixels` / `linear pixels`, written under train.output_dir) and a run's random init
    (`knn RUN --random-init`, merged into its summary) are rows after the runs, marked, never ranked (issue 19)."""
    import shutil

    from simclr_tau.evaluation.cli import knn_main, linear_main
    from simclr_tau.records.compare import main

    root = tmp_path / "runs"
    for d in runs[:2]:  # copies: the module's runs stay without baselines
        shutil.copytree(d, root / d.name)
    a = root / runs[0].name
    knn_args = ["--k", "5", "--t", "0.1", "--no-diagnostics", "--no-progress"]
    rand = knn_main([str(a), "--random-init", *knn_args])
    linear_main([str(a), "--random-init", "--no-progress"])
    pix = knn_main(["pixels", "--config", TINY, f"train.output_dir={root}", *knn_args])
    pix_lin = linear_main(["pixels", "--config", TINY, f"train.output_dir={root}", "--no-progress"])
    assert (root / "pixels-synthetic" / "eval" / "knn.json").is_file()
    capsys.readouterr()

    comp = main([str(root), "--out", str(tmp_path / "cmp")])  # the directory of runs holds the pixels' too
    out = capsys.readouterr().out
    assert [r.name for r in comp.runs] == ["tau-fixed", "tau-learnable", "raw pixels (synthetic)", "random init (resnet10t)"]
    col = {h: i for i, h in enumerate(comp.headers)}
    knn, lin, ece = col["kNN k=5 T=0.1 top-1"], col["linear top-1"], col["ECE after (%)"]
    assert comp.raw[2][knn] == pix["results"][0]["top1"] and comp.raw[2][lin] == pix_lin["metrics"]["linear/test_top1"]
    assert comp.raw[3][knn] == rand["results"][0]["top1"]
    assert comp.raw[3][ece] == pytest.approx(100 * summary(a)["calib_random_init/ece_after"])  # in %, as the runs'
    assert [comp.raw[i][col["method"]] for i in (2, 3)] == ["baseline: raw pixels", "baseline: random init"]
    assert all("★" not in cell for row in comp.text[2:] for cell in row)
    assert "baseline: raw pixels" in out and "warning" not in out
    assert "differing: optim.lr, temperature.init, temperature.mode" in out  # the runs' differences only
    assert all(len(v) == 2 for v in comp.diff.values())  # one column per run, none per baseline
    page = comp.html.read_text()
    assert "2 runs and 2 baselines" in page and page.count("<tr class='baseline'>") == 4  # sources + metrics
    assert dict(comp.images)["final metrics"].is_file()

    # the pixels' directory (or its eval/) given by name; --no-baselines leaves every baseline out
    comp = main([str(root / "tau-fixed"), str(root / "pixels-synthetic" / "eval"), "--out", str(tmp_path / "c2")])
    assert [r.name for r in comp.runs] == ["tau-fixed", "raw pixels (synthetic)", "random init (resnet10t)"]
    comp = main([str(root), "--no-baselines", "--no-plots", "--out", str(tmp_path / "c3")])
    assert [r.name for r in comp.runs] == ["tau-fixed", "tau-learnable"]
    _expect_exit_2(capsys, main, [str(root / "pixels-synthetic"), "--out", str(tmp_path / "c4")],
                   "baselines alone are not a comparison")


def test_a_baseline_is_never_the_best_and_counts_in_the_mixed_datasets_warning(tmp_path: Path, capsys) -> None:
    from simclr_tau.records.baselines import random_init_rows
    from simclr_tau.records.compare import compare

    cfg = {"data.name": "fashion_mnist", "model.backbone": "resnet18"}
    a = RunData("a", "x", {**cfg, "temperature.mode": "fixed"}, {KNN: 80.0, "knn_random_init/top1_k5_t0.1": 60.0})
    b = RunData("b", "x", {**cfg, "temperature.mode": "learnable"}, {KNN: 82.0, "knn_random_init/top1_k5_t0.1": 60.0})
    pixels = RunData("raw pixels (fashion_mnist)", "p", {"data.name": "fashion_mnist"}, {KNN: 85.0}, baseline="raw pixels")
    rand, = random_init_rows([a, b])  # the same architecture and numbers: one row
    assert rand.final == {KNN: 60.0} and rand.baseline == "random init"
    comp = compare([a, b, pixels], echo=False)
    j = comp.headers.index("kNN k=5 T=0.1 top-1")
    assert [row[j] for row in comp.text] == ["80", "82 ★", "85", "60"]  # pixels ahead, b marked best
    other = RunData("raw pixels (cifar10)", "p", {"data.name": "cifar10"}, {KNN: 40.0}, baseline="raw pixels")
    compare([a, b, other])
    assert "warning: runs of different datasets are mixed (cifar10, fashion_mnist)" in capsys.readouterr().out
