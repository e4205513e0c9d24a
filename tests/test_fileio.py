"""Files we write atomically get the mode a plain ``open(path, "w")`` would give (issue 19: exported encoders,
checkpoints and caches came out 0600 because mkstemp / safetensors create their files that way)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from simclr_tau.config import load_config
from simclr_tau.evaluation.results import write_json
from simclr_tau.fileio import atomic_write, default_file_mode, umask
from simclr_tau.models.encoder import build_encoder
from simclr_tau.models.export import load_encoder, save_encoder
from simclr_tau.train.checkpoint import atomic_save, load_checkpoint


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_umask_is_read_without_changing_it() -> None:
    old = os.umask(0o027)
    try:
        assert umask() == 0o027 and default_file_mode() == 0o640
        assert umask() == 0o027
    finally:
        os.umask(old)


def test_exported_encoder_checkpoint_and_eval_json_are_0644_under_umask_022(umask_022, tmp_path: Path) -> None:
    encoder, _ = build_encoder(load_config(None, ["model.backbone=resnet10t"]).model, 1)
    enc = tmp_path / "run" / "encoder.safetensors"
    save_encoder(enc, encoder, load_config(None, ["model.backbone=resnet10t"]).model, 1, 28, [0.5], [0.25])
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001.pt"
    atomic_save({"step": 1, "w": torch.ones(2)}, ckpt)
    js = write_json(tmp_path / "run" / "eval" / "knn.json", {"top1": 1.0})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert [mode(p) for p in (enc, ckpt, js)] == [mode(plain)] * 3 == [0o644] * 3
    assert load_encoder(enc)[1]["in_chans"] == 1 and load_checkpoint(ckpt)["step"] == 1
    assert sorted(p.name for p in (tmp_path / "run").rglob("*.tmp")) == []  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
