"""What a run leaves (issue 19): a changed config on resume is reported and kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from simclr_tau.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pretrain(tmp_path: Path, name: str, *overrides: str) -> Path:
    main(["pretrain", TINY, f"train.output_dir={tmp_path}", f"train.run_name={name}", *overrides])
    return tmp_path / name


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
