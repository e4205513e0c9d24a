"""What a run prints and leaves (issue 19): plain log lines off a terminal, the bar on one, the end-of-run
summary, images/s without the online kNN, the resolved config.yaml, a changed config on resume, and a tiny run
that `simclr-tau knn` evaluates with its defaults."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import yaml

from simclr_tau.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pretrain(tmp_path: Path, name: str, *overrides: str) -> Path:
    main(["pretrain", TINY, f"train.output_dir={tmp_path}", f"train.run_name={name}", *overrides])
    return tmp_path / name


def test_off_a_terminal_a_run_logs_plain_lines_and_ends_with_a_summary(tmp_path: Path, capsys) -> None:
    """Under pytest stdout is not a terminal, as in a batch job; the run uses the documented `mixed_precision=no`."""
    run_dir = pretrain(tmp_path, "plain", "train.progress=true", "train.mixed_precision=no", "eval.online_knn_every=1")
    out, err = capsys.readouterr()
    assert "\r" not in out + err  # no bar frames in the log
    lines = out.splitlines()
    logged = rows(run_dir)
    steps = [r for r in logged if "train/loss" in r]
    for r in steps:  # one line per log step (log_every=1): step/total, loss, τ, images/s
        line = f"step {r['step']}/4 (epoch {r['epoch']:.2f})  loss {r['train/loss']:.4g}  tau {r['train/tau']:.4g}  " \
               f"images/s {r['train/images_per_s']:.0f}"
        assert line in lines, (line, lines)
    assert "step 4/4: online kNN ..." in lines
    knn = next(r for r in logged if "online_knn/top1_k5_t0.1" in r)["online_knn/top1_k5_t0.1"]
    # the summary: final loss, τ, online kNN, the encoder, the next command
    assert lines[-4:] == [
        f"done: 4 steps (1 epoch): final loss {steps[-1]['train/loss']:.4g}, tau 0.1, online kNN top1_k5_t0.1 {knn:.2f}%",
        f"encoder: {run_dir / 'encoder.safetensors'} (load_encoder only: plain timm cannot build its stem)",
        f"run directory: {run_dir}",
        f"next: simclr-tau knn {run_dir}",
    ]
    assert (run_dir / "encoder.safetensors").is_file()

    # the saved config holds the values the run used, not null
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["mixed_precision"] == "no"
    assert saved["data"]["image_size"] == 16
    assert (saved["augment"]["crop_scale_min"], saved["augment"]["blur_p"]) == (0.2, 0.0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"]["data.image_size"] == 16

    # the tiny config evaluates with its own defaults (k=200 would exceed its 64 images)
    from simclr_tau.evaluation.cli import knn_main

    result = knn_main([str(run_dir), "--no-diagnostics", "--no-progress"])
    assert [(r["k"], r["T"]) for r in result["results"]] == [(5, 0.1), (20, 0.07)]


def test_progress_false_prints_only_the_summary(tmp_path: Path, capsys) -> None:
    """With the ImageNet stem the export is a plain timm model: the summary says how timm loads it."""
    import timm
    import torch

    from simclr_tau.models.export import load_encoder

    run_dir = pretrain(tmp_path, "quiet", "train.progress=false", "model.small_stem=false")
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"done: 4 steps (1 epoch): final loss {rows(run_dir)[-1]['train/loss']:.4g}, tau 0.1",
        f"encoder: {run_dir / 'encoder.safetensors'} (timm: timm.create_model('local-dir:{run_dir}', pretrained=True))",
        f"run directory: {run_dir}",
        f"next: simclr-tau knn {run_dir}",
    ]
    assert "%|" not in err  # no bar either
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()(x), load_encoder(
            run_dir / "encoder.safetensors")[0](x))


def test_per_sample_tau_is_summarized_by_its_mean(tmp_path: Path, capsys) -> None:
    run_dir = pretrain(tmp_path, "cond", "temperature.mode=conditional", "temperature.init=0.2")
    first = capsys.readouterr().out.splitlines()[0]
    assert f", tau mean {rows(run_dir)[-1]['train/tau_mean']:.4g}" in first and ", tau " not in first.replace("tau mean", "")


def _slow_online_knn(seconds: float, capsys, seen: dict):
    """A stand-in for the online kNN that takes ``seconds`` and records what was printed by the time it ran."""

    def build(*args, **kwargs):
        def evaluate() -> dict:
            seen.setdefault("printed before", []).append(capsys.readouterr())
            time.sleep(seconds)
            return {"knn/top1_k5_t0.1": 50.0, "knn/top5_k5_t0.1": 100.0}

        return evaluate

    return build


def test_images_per_s_after_an_online_knn_leaves_the_knn_time_out(tmp_path: Path, capsys, monkeypatch) -> None:
    import simclr_tau.train.pretrain as pretrain_run

    seen: dict = {}
    pause = 1.5
    monkeypatch.setattr(pretrain_run, "online_knn_fn", _slow_online_knn(pause, capsys, seen))
    run_dir = pretrain(tmp_path, "speed", "train.epochs=2", "eval.online_knn_every=1", "train.progress=true")
    first, second = seen["printed before"]  # what was printed by the time each kNN ran (epochs 1 and 2)
    assert first.out.splitlines()[-1] == "step 4/8: online kNN ..."  # said while it ran
    assert second.out.splitlines()[0] == "online kNN: top1_k5_t0.1 50 (1.5 s)"  # and when it was done
    assert second.out.splitlines()[-1] == "step 8/8: online kNN ..."
    speed = {r["step"]: r["train/images_per_s"] for r in rows(run_dir) if "train/images_per_s" in r}
    # a window holding the 1.5 s pause could not exceed 16 images / 1.5 s; the steps alone take far less
    assert speed[5] > 16 / pause, speed
    assert speed[5] > 0.2 * speed[6], speed


def test_on_a_terminal_the_bar_stays_and_shows_the_online_knn(tmp_path: Path, capsys, monkeypatch) -> None:
    import simclr_tau.train.pretrain as pretrain_run
    import simclr_tau.train.progress as progress

    seen: dict = {}
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    monkeypatch.setattr(pretrain_run, "online_knn_fn", _slow_online_knn(0.0, capsys, seen))
    run_dir = pretrain(tmp_path, "tty", "eval.online_knn_every=1", "train.progress=true")
    out, err = capsys.readouterr()
    assert not [line for line in out.splitlines() if line.startswith("step ")]  # no plain lines on a terminal
    assert "online kNN ..." in seen["printed before"][0].err.split("\r")[-1]  # the bar's last frame before the kNN
    assert "4/4" in err
    assert out.splitlines()[-1] == f"next: simclr-tau knn {run_dir}"


# ---- resume with a changed config ---------------------------------------------------------------------------

def test_overrides_after_resume_and_a_changed_config_is_reported_and_kept(tmp_path: Path, capsys) -> None:
    run_dir = pretrain(tmp_path, "r", "optim.lr=0.1")
    before = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    main(["pretrain", TINY, f"train.output_dir={tmp_path}", "train.run_name=r", "--resume", "auto", "train.epochs=2",
          "optim.lr=0.2"])
    out = capsys.readouterr().out
    changed = [line for line in out.splitlines() if line.startswith("config changed")]
    assert changed == ["config changed on resume at step 4: optim.lr: 0.1 -> 0.2; train.epochs: 1 -> 2 "
                       "(the previous config is kept as config.4.yaml)"]
    assert out.index("config changed") < out.index("run directory:")  # said before it trained on
    assert (run_dir / "config.4.yaml").read_text() == before
    now = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (now["train"]["epochs"], now["optim"]["lr"]) == (2, 0.2)
    assert [r["step"] for r in rows(run_dir)] == list(range(1, 9))  # it did train the second epoch

    # the same config again: nothing to report, nothing kept
    main(["pretrain", TINY, f"train.output_dir={tmp_path}", "train.run_name=r", "train.epochs=2", "optim.lr=0.2",
          "--resume", "auto"])
    assert "config changed" not in capsys.readouterr().out
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == ["config.4.yaml", "config.yaml"]


def test_the_nulls_an_older_version_saved_are_no_change(tmp_path: Path, capsys) -> None:
    """config.yaml of a run from before the defaults were filled in: `null` where this version writes 16 / 0.2 / 0."""
    run_dir = pretrain(tmp_path, "old", "train.max_steps=2")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["data"]["image_size"] = saved["augment"]["crop_scale_min"] = saved["augment"]["blur_p"] = None
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    main(["pretrain", TINY, f"train.output_dir={tmp_path}", "train.run_name=old", "--resume", "auto", "train.max_steps=2"])
    assert "config changed" not in capsys.readouterr().out
    assert not (run_dir / "config.2.yaml").exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["image_size"] == 16


def test_every_changed_config_file_is_kept_and_one_line_printed(tmp_path: Path, capsys) -> None:
    """A distillation run has two config files (distill.yaml, the full one, and config.yaml, its student view)."""
    from simclr_tau.train.session import keep_changed_configs

    (tmp_path / "distill.yaml").write_text("train:\n  epochs: 1\nteacher:\n  path: a\n")
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 1\n")
    (tmp_path / "distill.8.yaml").write_text("an older resume at the same step\n")
    kept = keep_changed_configs(tmp_path, {"distill.yaml": "train:\n  epochs: 3\nteacher:\n  path: b\n",
                                           "config.yaml": "train:\n  epochs: 3\n"}, 8)
    assert kept == ["distill.8.1.yaml", "config.8.yaml"]
    assert capsys.readouterr().out == ("config changed on resume at step 8: train.epochs: 1 -> 3; teacher.path: a -> b "
                                       "(the previous config is kept as distill.8.1.yaml, config.8.yaml)\n")
    assert (tmp_path / "distill.8.yaml").read_text() == "an older resume at the same step\n"
    assert (tmp_path / "distill.8.1.yaml").read_text().endswith("path: a\n")
    assert re.search(r"epochs: 1", (tmp_path / "config.8.yaml").read_text())


def test_config_changes_name_added_and_removed_keys() -> None:
    from simclr_tau.train.session import config_changes

    assert config_changes("a:\n  b: 1\n  c: null\n", "a:\n  b: 1\n  d: [1, 2]\n") == \
        ["a.d: <absent> -> [1, 2]", "a.c: null -> <absent>"]
    assert config_changes("mixed_precision: 'no'\n", "mixed_precision: 'no'\n") == []
