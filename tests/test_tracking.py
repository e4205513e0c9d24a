"""The run record and its W&B mirror: what reaches W&B (config, every metric row, τ histograms, evaluation
results, names / group / tags, entity / project from the environment) against a fake ``wandb.init`` at the
boundary; offline by default without an API key, with the same W&B run id across a restart and the
evaluations; evaluation that finishes with W&B unreachable; the W&B Sweep YAML's argument format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simclr_tau.config import flatten, load_config, resolve_defaults
from simclr_tau.records.writer import RunRecord, default_group, run_tags, wandb_mode, wandb_mode_reason

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")
EVAL = ["--k", "5", "--t", "0.1", "--no-diagnostics", "--no-progress"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no settings from this machine
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_auto_mode_is_offline_without_an_api_key(no_wandb_credentials, monkeypatch, tmp_path) -> None:
    assert wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # `wandb login` writes this
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins
    assert wandb_mode("auto") == "disabled"
    assert wandb_mode("offline") == "offline"  # an explicit mode is kept


def test_auto_mode_finds_a_wandb_login_for_the_configured_host(no_wandb_credentials, monkeypatch, tmp_path) -> None:
    """``wandb login --host`` stores the key under the host's name: auto mode looks it up for that host."""
    key = "h" * 40
    (tmp_path / "netrc").write_text(f"machine wandb.example.org\n  login user\n  password {key}\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode_reason("auto") == ("offline", "no API key for api.wandb.ai")  # the key is for another host
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode_reason("auto") == ("online", "API key for wandb.example.org from wandb login")
    monkeypatch.delenv("WANDB_BASE_URL")
    (tmp_path / "wandb-config").mkdir()
    (tmp_path / "wandb-config" / "settings").write_text("[default]\nbase_url = https://wandb.example.org\n")
    assert wandb_mode("auto") == "online"  # the host from wandb's settings file
    monkeypatch.setenv("WANDB_BASE_URL", "https://other.example.org")
    assert wandb_mode_reason("auto") == ("offline", "no API key for other.example.org")


def test_a_real_offline_run_prints_one_line_with_its_directory_and_the_sync_command(
        no_wandb_credentials, tmp_path, capsys) -> None:
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", "wandb.enabled=true", "wandb.mode=auto"])
    record = RunRecord(tmp_path / "r", cfg, "r")
    record.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if "W&B" in line]
    assert len(lines) == 1, lines
    offline_dir, = (tmp_path / "r" / "wandb").glob("offline-run-*")
    assert lines[0] == (f"W&B: offline (no API key for api.wandb.ai): {offline_dir}; "
                        f"upload later with `wandb sync {offline_dir}`")


def test_online_and_disabled_runs_say_so_in_one_line(fake_wandb_init, monkeypatch, tmp_path, capsys) -> None:
    """Online against a fake ``wandb.init`` (the W&B cloud is mocked: unreachable here): the line has the run URL."""
    import wandb

    real_init = wandb.init

    def init_with_url(**kw):
        run = real_init(**kw)
        run.url = f"https://wandb.ai/tau-team/tau-study/runs/{run.id}"
        return run

    monkeypatch.setattr(wandb, "init", init_with_url)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", "wandb.enabled=true", "wandb.mode=auto"])
    RunRecord(tmp_path / "on", cfg, "on").close()
    assert capsys.readouterr().out.splitlines() == [
        "W&B: online (WANDB_API_KEY is set): https://wandb.ai/tau-team/tau-study/runs/fakeid0"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    RunRecord(tmp_path / "off", cfg, "off").close()
    assert capsys.readouterr().out.splitlines() == [
        f"W&B: disabled (WANDB_MODE=disabled); the local record in {tmp_path / 'off'} is complete"]


def test_the_default_group_is_the_experiment_not_the_tau_setting() -> None:
    """Every τ of one study shares the group; its epochs, batch, method are part of it; wandb.group wins."""
    groups = {default_group(load_config(TINY, [f"temperature.mode={m}"])) for m in ("fixed", "learnable", "conditional")}
    assert len(groups) == 1
    assert default_group(load_config(TINY, ["train.epochs=7"])) != groups.pop()
    assert default_group(load_config(TINY, ["wandb.group=study-3"])) == "study-3"


def test_tags_name_method_tau_mode_dataset_backbone_and_schedule() -> None:
    cfg = load_config(TINY, ["temperature.mode=scheduled", "temperature.schedule.kind=cosine",
                             "temperature.schedule.start=0.5", "temperature.schedule.end=0.07"])
    assert run_tags(cfg) == {"method": "simclr", "tau_mode": "scheduled", "dataset": "synthetic",
                             "backbone": "resnet10t", "tau_schedule": "cosine"}
    assert "tau_schedule" not in run_tags(load_config(TINY, ["temperature.mode=learnable"]))


# ---- what reaches W&B, against a fake wandb.init -------------------------------------------------------

class FakeWandbRun:
    """Records what RunRecord sends to a W&B run (stands in for wandb.sdk.wandb_run.Run)."""

    def __init__(self, run_id: str) -> None:
        self.id = run_id
        self.logged: list[dict] = []
        self.summary: dict = {}
        self.step_metric = None
        self.finished = False

    def define_metric(self, name, step_metric=None, **kw):
        self.step_metric = (name, step_metric)

    def log(self, row: dict) -> None:
        self.logged.append(dict(row))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb_init(monkeypatch, no_wandb_credentials):
    import wandb

    calls: list[tuple[dict, FakeWandbRun]] = []

    def init(**kwargs):
        run = FakeWandbRun(kwargs.get("id") or f"fakeid{len(calls)}")
        calls.append((kwargs, run))
        return run

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_ENTITY", "tau-team")
    monkeypatch.setenv("WANDB_PROJECT", "tau-study")
    return calls


def test_training_and_evaluation_reach_the_same_wandb_run(fake_wandb_init, tmp_path) -> None:
    import wandb

    from simclr_tau.evaluation.cli import knn_main, linear_main
    from simclr_tau.train.pretrain import run

    cfg = load_config(TINY, [f"train.output_dir={tmp_path}", "train.run_name=cond", "temperature.mode=conditional",
                             "wandb.enabled=true", "wandb.mode=offline", "wandb.tags=[study-1]"])
    run_dir = run(cfg).run_dir
    (kw, wrun), = fake_wandb_init
    # naming / grouping convention; entity and project from the environment; the whole config
    assert kw["name"] == "cond" and kw["group"] == f"simclr-synthetic-resnet10t-{cfg.train.epochs}ep-bs16" and kw["job_type"] == "simclr"
    assert kw["tags"] == ["method:simclr", "tau_mode:conditional", "dataset:synthetic", "backbone:resnet10t", "study-1"]
    assert (kw["entity"], kw["project"]) == ("tau-team", "tau-study")
    assert kw["mode"] == "offline" and kw["resume"] == "allow" and kw["dir"] == str(run_dir)
    # the config the run used: its run-time defaults (image size, size-aware augmentation, τ bounds) resolved
    assert flatten(kw["config"]) == summary(run_dir)["config"] == flatten(resolve_defaults(cfg, 16))
    assert summary(run_dir)["config"]["data.image_size"] == 16 and flatten(cfg)["data.image_size"] is None
    assert wrun.step_metric == ("*", "step") and wrun.finished
    # every metrics.jsonl row, as is; a per-sample τ histogram at every logging step
    scalar_rows = [r for r in wrun.logged if "train/tau_hist" not in r]
    assert scalar_rows == rows(run_dir)
    assert all({"train/loss", "train/tau_mean", "train/tau_min", "train/tau_max", "train/tau_std",
                "train/images_per_s", "train/lr"} <= set(r) for r in scalar_rows)
    hists = [r for r in wrun.logged if "train/tau_hist" in r]
    assert [h["step"] for h in hists] == [r["step"] for r in scalar_rows]
    assert all(isinstance(h["train/tau_hist"], wandb.Histogram) for h in hists)
    assert wrun.summary["final/train_loss"] == summary(run_dir)["final/train_loss"]
    assert summary(run_dir)["wandb_id"] == wrun.id
    assert summary(run_dir)["train/tau_mean"] == rows(run_dir)[-1]["train/tau_mean"]  # last logged values too

    # evaluation resumes the same W&B run by its id and writes its results to the run summary
    knn_main([str(run_dir), "wandb.enabled=true", "wandb.mode=offline", *EVAL])
    linear_main([str(run_dir), "wandb.enabled=true", "wandb.mode=offline", "--no-progress"])
    (kw_knn, knn_run), (kw_lin, lin_run) = fake_wandb_init[1:]
    assert kw_knn["id"] == kw_lin["id"] == wrun.id and kw_knn["resume"] == "allow"
    s = summary(run_dir)
    assert knn_run.summary["knn/top1_k5_t0.1"] == s["knn/top1_k5_t0.1"]
    for key in ("linear/test_top1", "calib/ece_before", "calib/ece_after", "calib/T"):
        assert lin_run.summary[key] == s[key]
    assert s["final/train_loss"] == wrun.summary["final/train_loss"]  # merged, not replaced


# ---- real wandb, offline ------------------------------------------------------------------------------

def _offline_ids(run_dir: Path) -> list[str]:
    """W&B run ids of the offline run directories: offline-run-<YYYYmmdd_HHMMSS>-<id>, and wandb appends -<n>
    when two attempts of one run start within the same second."""
    import re

    ids = [re.fullmatch(r"offline-run-\d{8}_\d{6}-([^-]+)(?:-\d+)?", p.name) for p in (run_dir / "wandb").glob("offline-run-*")]
    assert all(ids), sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    return sorted(m.group(1) for m in ids)


def test_no_api_key_means_offline_files_in_the_run_dir_and_one_id_across_restart_and_eval(
        no_wandb_credentials, tmp_path) -> None:
    from simclr_tau.evaluation.cli import knn_main
    from simclr_tau.train.pretrain import run

    common = [f"train.output_dir={tmp_path}", "train.run_name=off", "temperature.mode=learnable", "optim.lr=2.0",
              "wandb.enabled=true", "wandb.mode=auto"]
    run_dir = run(load_config(TINY, common)).run_dir  # 1 epoch = 4 steps
    wid = summary(run_dir)["wandb_id"]
    assert _offline_ids(run_dir) == [wid]
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3, 4]  # the local record is complete

    # a restart continues the same W&B run (id from the checkpoint), and so does the evaluation
    run(load_config(TINY, [*common, "train.epochs=2"]), resume="auto")
    knn_main([str(run_dir), "wandb.enabled=true", "wandb.mode=auto", *EVAL])
    assert _offline_ids(run_dir) == [wid] * 3
    assert [r["step"] for r in rows(run_dir)] == list(range(1, 9))
    assert summary(run_dir)["wandb_id"] == wid and "knn/top1_k5_t0.1" in summary(run_dir)


def test_evaluation_finishes_when_wandb_is_unreachable(tmp_path) -> None:
    from simclr_tau.train.pretrain import run

    run_dir = run(load_config(TINY, [f"train.output_dir={tmp_path}", "train.run_name=r", "train.max_steps=2"])).run_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NETRC": str(tmp_path / "no-netrc"),
                "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens on the discard port
                "WANDB_API_KEY": "0123456789abcdef0123456789abcdef01234567",  # 40 characters, not a real key
                "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                "SIMCLR_TAU_WANDB_INIT_TIMEOUT": "3"})
    proc = subprocess.run([sys.executable, "-m", "simclr_tau", "knn", str(run_dir), "wandb.enabled=true",
                           "wandb.mode=online", *EVAL], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B" in proc.stderr  # one warning says so
    knn = json.loads((run_dir / "eval" / "knn.json").read_text())
    assert summary(run_dir)["knn/top1_k5_t0.1"] == knn["metrics"]["knn/top1_k5_t0.1"]


# ---- W&B Sweeps -----------------------------------------------------------------------------------------

def test_sweep_yaml_arguments_are_our_overrides() -> None:
    """Expand the sweep's command for every grid point with wandb's own formatter, then parse it like the CLI."""
    import itertools

    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from simclr_tau.pretrain import build_parser

    sweep = yaml.safe_load((REPO / "configs" / "sweeps" / "wandb_tau_sweep.yaml").read_text())
    assert sweep["method"] == "grid" and "${args_no_hyphens}" in sweep["command"]
    params = sweep["parameters"]
    grid = [[(k, v) for v in p["values"]] if "values" in p else [(k, p["value"])] for k, p in params.items()]
    points = list(itertools.product(*grid))
    assert len(points) == 9
    for point in points:
        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point}})["args_no_hyphens"]
        argv = []
        for chunk in sweep["command"]:  # as wandb's agent substitutes whole ${...} chunks
            argv += args if chunk == "${args_no_hyphens}" else ([] if chunk.startswith("${") else [chunk])
        assert argv[:3] == ["-m", "simclr_tau", "pretrain"]
        ns = build_parser().parse_args(argv[3:])
        cfg = load_config(REPO / ns.config, ns.overrides)
        flat = flatten(cfg)
        for k, v in point:
            assert flat[k] == v, (k, v, flat[k])
        assert flat["eval.online_knn_every"] == 1  # the sweep's metric is logged
    metric = sweep["metric"]["name"]
    assert metric == f"online_knn/top1_k{cfg.eval.knn_k[0]}_t{cfg.eval.knn_t[0]:g}"
