"""Checkpoint lineage (issue 18, item 4): a run restarted from step s (an explicit older ``--resume CKPT``, or step 0
after a failed start) retires the checkpoints newer than s, so retention keeps the new lineage's newest
checkpoints and a later ``--resume auto`` continues the new lineage, not the abandoned one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from simclr_tau.config import load_config
from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint, prune
from simclr_tau.train.pretrain import run

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")
COMMON = ["train.epochs=2", "train.deterministic=true", "train.save_every_steps=2"]  # 8 steps, saves at 2, 4, 6, 8


def cfg(tmp_path: Path, name: str, *overrides: str):
    return load_config(TINY, [f"train.output_dir={tmp_path}", f"train.run_name={name}", *COMMON, *overrides])


def names(directory: Path) -> list[str]:
    return [p.name for p in list_checkpoints(directory)]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_restart_from_an_older_checkpoint_retires_the_newer_ones_and_resume_auto_follows_the_new_lineage(
        tmp_path: Path, capsys, monkeypatch) -> None:
    """Attempt 1 (lr 0.1) runs to step 8; attempt 2 restarts from step 4 with lr 0.05 and is stopped after step 6
    (SIGTERM: save and exit); attempt 3 is --resume auto. It must continue attempt 2 from step 6 and end on the
    weights of an uninterrupted lr-0.05 run from step 4; the abandoned steps 6 and 8 are moved aside, not mixed in."""
    from simclr_tau.methods.simclr import SimCLR

    first = run(cfg(tmp_path, "x", "train.keep_last=10"))
    ckpts = first.run_dir / "checkpoints"
    assert names(ckpts) == [f"step_{s:08d}.pt" for s in (2, 4, 6, 8)]
    old_6, old_8 = (ckpts / "step_00000006.pt").read_bytes(), (ckpts / "step_00000008.pt").read_bytes()
    step_4 = tmp_path / "step_4.pt"
    shutil.copy(ckpts / "step_00000004.pt", step_4)

    # the reference: lr 0.05 from step 4 to the end, uninterrupted, in a directory of its own
    ref = run(cfg(tmp_path, "ref", "optim.lr=0.05", "train.keep_last=10"), resume=str(step_4))
    assert ref.step == 8

    after_step = SimCLR.after_step

    def sigterm_in_step_6(self, step: int) -> None:
        after_step(self, step)
        if step == 5:  # 0-based: the 6th step
            os.kill(os.getpid(), signal.SIGTERM)

    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(SimCLR, "after_step", sigterm_in_step_6)
        second = run(cfg(tmp_path, "x", "optim.lr=0.05", "train.keep_last=2"), resume=str(ckpts / "step_00000004.pt"))
    out = capsys.readouterr().out
    assert second.stopped_early and second.step == 6
    retired = [d for d in ckpts.iterdir() if d.is_dir()]
    assert len(retired) == 1 and retired[0].name.startswith("retired-")
    assert (f"restarting from step 4: moved 2 checkpoint(s) of the abandoned attempt (steps 6..8) to {retired[0]}"
            in out), out
    assert (retired[0] / "step_00000006.pt").read_bytes() == old_6  # the abandoned lineage, intact
    assert (retired[0] / "step_00000008.pt").read_bytes() == old_8
    assert names(ckpts) == ["step_00000004.pt", "step_00000006.pt"]  # the one just written is the newest, kept

    third = run(cfg(tmp_path, "x", "optim.lr=0.05", "train.keep_last=2"), resume="auto")
    assert f"resumed from {ckpts / 'step_00000006.pt'} at step 6" in capsys.readouterr().out
    assert third.step == 8 and not third.stopped_early
    a = load_checkpoint(ref.run_dir / "checkpoints" / "step_00000008.pt")["model"]
    b = load_checkpoint(ckpts / "step_00000008.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log, ref_log = rows(first.run_dir), rows(ref.run_dir)
    assert [r["step"] for r in log] == list(range(1, 9))
    assert [r["train/loss"] for r in log[4:]] == [r["train/loss"] for r in ref_log]  # steps 5..8: the new lineage


def test_a_restart_from_step_0_retires_the_checkpoints_of_the_failed_start(tmp_path: Path, capsys) -> None:
    """A start whose checkpoints are all unreadable restarts from step 0: its files (steps 6 and 7, beyond this
    4-step run) are moved aside, so that retention by name cannot delete the new run's checkpoints for them."""
    run_dir = tmp_path / "x"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "epoch": 0.25, "train/loss": 3.0}\n')
    for s in (6, 7):
        (run_dir / "checkpoints" / f"step_{s:08d}.pt").write_bytes(b"torn by a kill")
    with pytest.warns(UserWarning, match="skipping checkpoint: .* is not a readable checkpoint"):
        result = run(load_config(TINY, [f"train.output_dir={tmp_path}", "train.run_name=x", "train.keep_last=1",
                                        "train.save_every_steps=2"]), resume="auto")
    out = capsys.readouterr().out
    assert "restarting x from step 0" in out
    assert "restarting from step 0: moved 2 checkpoint(s) of the abandoned attempt (steps 6..7) to " in out
    assert result.step == 4 and names(run_dir / "checkpoints") == ["step_00000004.pt"]
    assert load_checkpoint(run_dir / "checkpoints" / "step_00000004.pt")["step"] == 4


def test_retention_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    for s in (2, 8, 9):
        (tmp_path / f"step_{s:08d}.pt").write_bytes(b"x")
    prune(tmp_path, keep_last=1, keep=tmp_path / "step_00000002.pt")
    assert names(tmp_path) == ["step_00000002.pt", "step_00000009.pt"]
    prune(tmp_path, keep_last=1)
    assert names(tmp_path) == ["step_00000009.pt"]
