"""A resume between two log rows (``train.log_every`` > 1): the first row after it averages the same steps as an
uninterrupted run's row for that step, because the checkpoint carries the row's running loss sum."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from procs import TINY
from simclr_tau.config import load_config
from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint
from simclr_tau.train.loop import LossWindow
from simclr_tau.train.pretrain import run

# 8 steps; rows at 4 and 8, checkpoints at 3, 4 (epoch end), 6 and 8
COMMON = ["train.epochs=2", "train.deterministic=true", "train.log_every=4", "train.save_every_steps=3",
          "train.keep_last=10", "train.run_name=r"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_speed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "train/images_per_s"}


def test_the_first_row_after_a_resume_between_log_rows_equals_the_uninterrupted_one(tmp_path: Path, capsys) -> None:
    full = run(load_config(TINY, [f"train.output_dir={tmp_path / 'full'}", *COMMON])).run_dir
    assert [r["step"] for r in rows(full)] == [4, 8]
    window = load_checkpoint(full / "checkpoints" / "step_00000006.pt")["log_window"]
    assert window["from_step"] == 4 and window["loss_sum"].shape == () and window["loss_sum"] > 0  # steps 5, 6

    resumed_dir = tmp_path / "resumed" / "r"
    shutil.copytree(full, resumed_dir)
    (resumed_dir / "checkpoints" / "step_00000008.pt").unlink()  # killed between steps 6 and 8
    capsys.readouterr()
    run(load_config(TINY, [f"train.output_dir={tmp_path / 'resumed'}", *COMMON]), resume="auto")
    assert "at step 6" in capsys.readouterr().out
    assert [without_speed(r) for r in rows(resumed_dir)] == [without_speed(r) for r in rows(full)]
    a = load_checkpoint(list_checkpoints(full / "checkpoints")[-1])["model"]
    b = load_checkpoint(list_checkpoints(resumed_dir / "checkpoints")[-1])["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_without_a_window_starts_one_at_its_step() -> None:
    """Checkpoints written before the window existed: the row averages the steps run since the resume."""
    from accelerate import Accelerator

    device = torch.device("cpu")
    old = LossWindow(6, device, None)
    assert old.from_step == 6 and old.sum.item() == 0
    carried = LossWindow(6, device, {"from_step": 4, "loss_sum": torch.tensor(5.0)})
    carried.add(torch.tensor(2.0))
    carried.add(torch.tensor(1.0))
    assert carried.mean(8, Accelerator(cpu=True)) == 2.0  # (5 + 2 + 1) / 4 steps
    assert LossWindow(3, device, {"from_step": 4, "loss_sum": torch.tensor(5.0)}).from_step == 3  # not this lineage's
