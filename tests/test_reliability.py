"""Reliability and safety: kills, signals, corrupt or hostile checkpoints, bad input, divergence, full disk, W&B down.

Every user-fixable failure must end as one line ``error: <cause>; <fix>`` with exit status 2; a bug must keep
its traceback. Real processes are killed for the interruption tests (SIGKILL / SIGTERM at a step chosen while
they run), and the multi-process check is a real 2-process torchrun group.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from procs import ENV, TINY, Training, free_port, image_tree, logged_steps, run_proc
from simclr_tau.config import load_config
from simclr_tau.errors import UserError
from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint
from simclr_tau.train.pretrain import run



def tiny_cfg(tmp_path: Path, *overrides: str):
    return load_config(TINY, [f"train.output_dir={tmp_path}", *overrides])


def cli(tmp_path: Path, capsys, *args: str) -> str:
    """Run ``simclr-tau pretrain TINY ...`` in-process; assert exit 2 with one ``error:`` line; return it."""
    from simclr_tau.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["pretrain", TINY, f"train.output_dir={tmp_path}", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1] if err else ""  # warnings (e.g. a skipped checkpoint) may come before it
    assert line.startswith("error: ") and "Traceback" not in err, err
    return line


def all_finite(state: dict) -> bool:
    tensors = []
    for v in state.values():
        if isinstance(v, dict):
            if not all_finite(v):
                return False
        elif isinstance(v, torch.Tensor) and v.is_floating_point():
            tensors.append(v)
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---- interruption ---------------------------------------------------------------------------------

TOTAL = 8  # optimizer steps of a COMMON run
COMMON = ["train.epochs=2", "train.deterministic=true"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """An uninterrupted COMMON run with a checkpoint after every step (read-only: copy it before changing it).
    Checkpointing reads the state only, so its final weights are those of any COMMON run."""
    out = tmp_path_factory.mktemp("finished")
    return run(tiny_cfg(out, "train.run_name=done", *COMMON, "train.save_every_steps=1", "train.keep_last=10")).run_dir


def test_sigkill_at_a_random_step_loses_at_most_the_interval_and_resume_is_bit_exact(tmp_path: Path, capsys,
                                                                                     finished_run: Path) -> None:
    """SIGKILL once a randomly drawn step s is logged; --resume auto must redo at most save_every_steps steps
    and end on exactly the weights of an uninterrupted run (deterministic; both pipelines resume exactly,
    see test_pretrain). Reproduce a failure with SIMCLR_TAU_KILL_SEED=<seed printed below>."""
    interval, total = 3, TOTAL  # checkpoints at steps 3, 6 (interval) and 4, 8 (epoch ends)
    common = [*COMMON, f"train.save_every_steps={interval}", "train.keep_last=2"]
    seed = int(os.environ.get("SIMCLR_TAU_KILL_SEED", random.randrange(2**31)))
    s = random.Random(seed).randint(1, total - 2)
    print(f"SIMCLR_TAU_KILL_SEED={seed}: SIGKILL once step {s} is logged")
    run_dir = tmp_path / "killed"
    with Training(tmp_path, "train.run_name=killed", *common) as training:
        training.wait_for_step(run_dir, s)
        os.killpg(training.proc.pid, signal.SIGKILL)
        assert training.wait() == -signal.SIGKILL
    killed_at = logged_steps(run_dir)[-1]  # the process may have gone a little past s before the kill landed
    assert s <= killed_at < total

    capsys.readouterr()
    resumed = run(tiny_cfg(tmp_path, "train.run_name=killed", *common), resume="auto")
    out = capsys.readouterr().out
    m = re.search(r"resumed from (\S+) at step (\d+)", out)
    if m:
        from_step = int(m.group(2))
        assert Path(m.group(1)).name == f"step_{from_step:08d}.pt"
    else:  # killed before the first checkpoint: a clean restart
        assert "restarting killed from step 0" in out, out
        from_step = 0
    print(f"killed at step {killed_at}, resumed from step {from_step}")
    assert 0 <= killed_at - from_step <= interval
    assert resumed.step == total

    a = load_checkpoint(finished_run / "checkpoints" / f"step_{total:08d}.pt")["model"]  # uninterrupted
    b = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the run's log has every step once, with the uninterrupted run's losses; no temporary file is left
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in full_rows]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])  # preemption, Ctrl-C
def test_a_signal_finishes_the_step_saves_a_checkpoint_and_exits_0(tmp_path: Path, capsys, monkeypatch,
                                                                   sig: int) -> None:
    """The signal arrives inside optimizer step 2 (from its after_step hook): step 2 is finished, saved, and the
    command returns normally (exit status 0) with a message saying how to resume."""
    from simclr_tau.cli import main
    from simclr_tau.methods.simclr import SimCLR

    after_step = SimCLR.after_step

    def signal_during_step_2(self, step: int) -> None:
        after_step(self, step)
        if step == 1:  # 0-based index of the 2nd step
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(SimCLR, "after_step", signal_during_step_2)
    handler = signal.getsignal(sig)
    main(["pretrain", TINY, f"train.output_dir={tmp_path}", "train.run_name=sig", "train.epochs=3"])  # no SystemExit
    out = capsys.readouterr().out
    ckpts = tmp_path / "sig" / "checkpoints"
    assert f"stopped by signal at step 2; checkpoint saved in {ckpts}. Resume with --resume auto (train.run_name=sig)" \
        in out, out
    assert logged_steps(tmp_path / "sig") == [1, 2]  # the step it stopped at is logged ...
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002.pt"]  # ... and saved
    state = load_checkpoint(ckpts / "step_00000002.pt")
    assert state["step"] == 2 and all_finite(state)
    assert not (tmp_path / "sig" / "encoder.safetensors").exists()  # an interrupted run is not exported
    assert signal.getsignal(sig) is handler  # the previous handler is back


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path: Path) -> None:
    """Preemption signals reach ranks at different steps; rank 1 alone is signalled here. The ranks must agree
    on the step to stop at (else rank 0 would wait in the save barrier while rank 1 trains on: a hang)."""
    import psutil

    run_dir = tmp_path / "ddp"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()))
    with Training(tmp_path, "train.run_name=ddp", "train.epochs=3", launcher=torchrun) as training:
        training.wait_for_step(run_dir, 2)
        rank1 = [p for p in psutil.Process(training.proc.pid).children() if p.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGTERM)
        assert training.wait(timeout=90) == 0, training.stderr.read_text()[-3000:]
    out = training.stdout.read_text()
    m = re.search(r"stopped by signal at step (\d+)", out)
    assert m and out.count("stopped by signal") == 1, out  # printed by the main process only
    n = int(m.group(1))
    assert n == logged_steps(run_dir)[-1] < 12
    assert load_checkpoint(run_dir / "checkpoints" / f"step_{n:08d}.pt")["step"] == n


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(tmp_path: Path, finished_run: Path,
                                                                     capsys) -> None:
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    shutil.copy(finished_run / "metrics.jsonl", run_dir)  # all that a kill before step 1's save leaves ...
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "epo')  # ... with a line torn by the kill
    result = run(tiny_cfg(tmp_path, "train.run_name=done", "train.epochs=1"), resume="auto")
    assert f"no valid checkpoint in {run_dir / 'checkpoints'}: restarting done from step 0" in capsys.readouterr().out
    assert result.step == 4
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


# ---- checkpoints: truncated, hostile, another model, full disk --------------------------------------


class _ShellPayload:
    """Unpickling this runs ``touch <marker>``: what a hostile checkpoint could do with pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _hostile_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"model": {"x": _ShellPayload(marker)}, "optimizer": {}, "step": 5}, path)


def test_the_hostile_payload_is_live(tmp_path: Path) -> None:
    """The control for the refusal tests: an unsafe load really runs the payload."""
    path, marker = tmp_path / "evil.pt", tmp_path / "ran"
    _hostile_checkpoint(path, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_resume_auto_skips_a_truncated_and_a_hostile_checkpoint_with_warnings(tmp_path: Path, finished_run: Path,
                                                                              capsys) -> None:
    run_dir = tmp_path / "done"
    shutil.copytree(finished_run, run_dir)
    ckpts = run_dir / "checkpoints"
    newest = ckpts / f"step_{TOTAL:08d}.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # cut in half
    marker = tmp_path / "payload_ran"
    _hostile_checkpoint(ckpts / f"step_{TOTAL + 1:08d}.pt", marker)
    stale = ckpts / f".step_{TOTAL + 2:08d}.pt.k1ll3d.tmp"  # what a SIGKILL during a save leaves
    stale.write_bytes(b"\0" * 100)

    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(newest)
    capsys.readouterr()
    with pytest.warns(UserWarning) as warned:
        result = run(tiny_cfg(tmp_path, "train.run_name=done", *COMMON, "train.save_every_steps=1",
                              "train.keep_last=10"), resume="auto")
    messages = [str(w.message) for w in warned]
    assert any("skipping checkpoint" in m and f"step_{TOTAL + 1:08d}.pt was refused" in m for m in messages), messages
    assert any("skipping checkpoint" in m and f"step_{TOTAL:08d}.pt is not a readable checkpoint (truncated" in m
               for m in messages), messages
    assert f"resumed from {ckpts / f'step_{TOTAL - 1:08d}.pt'} at step {TOTAL - 1}" in capsys.readouterr().out
    assert result.step == TOTAL and load_checkpoint(newest)["step"] == TOTAL  # redone and rewritten whole
    assert not marker.exists()
    assert not stale.exists()  # removed by the next save


def test_a_hostile_checkpoint_passed_to_resume_is_refused_and_never_runs(tmp_path: Path, capsys) -> None:
    path, marker = tmp_path / "evil.pt", tmp_path / "payload_ran"
    _hostile_checkpoint(path, marker)
    line = cli(tmp_path, capsys, "train.run_name=x", "--resume", str(path))
    assert f"{path} was refused: it contains pickled objects beyond tensors" in line
    assert not marker.exists()


@pytest.mark.parametrize("overrides, expected", [
    # another backbone: different parameter names
    (["model.backbone=vit_tiny_patch16_224", "model.small_stem=false",
      "model.backbone_kwargs={img_size: 16, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}"],
     ["missing: ", "unexpected: "]),
    (["model.proj_dim=8"], ["shape mismatch: ", "projector"]),  # same names, other shapes
], ids=["other-backbone", "other-projection-size"])
def test_a_checkpoint_of_another_architecture_lists_the_mismatched_keys(tmp_path: Path, finished_run: Path, capsys,
                                                                       overrides: list, expected: list) -> None:
    ckpt = finished_run / "checkpoints" / f"step_{TOTAL:08d}.pt"
    line = cli(tmp_path, capsys, "train.run_name=other", *overrides, "--resume", str(ckpt))
    assert f"--resume {ckpt} does not match this model" in line
    assert "resume with the config the checkpoint was trained with" in line
    for text in expected:
        assert text in line


def test_no_space_left_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    """torch.save fails with ENOSPC half-way through writing step 4: step 2 stays intact, no temp file is left."""
    import simclr_tau.train.checkpoint as checkpoint

    real_save = torch.save
    ckpts = tmp_path / "full" / "checkpoints"
    before = {}

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if obj["step"] == 4:
            before["step 2"] = (ckpts / "step_00000002.pt").read_bytes()
            before["temporary"] = [p.name for p in ckpts.glob(".step_00000004.pt.*.tmp")]
            f.write(b"\0" * 1000)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_is_full)
    line = cli(tmp_path, capsys, "train.run_name=full", "train.save_every_steps=2", "train.keep_last=1")
    assert len(before["temporary"]) == 1  # the save did write to a temporary file ...
    assert "no space left on device while saving" in line and "step_00000004.pt" in line
    assert "the previous checkpoint is intact" in line and "free disk space" in line
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002.pt"]  # ... removed; no step 4
    assert (ckpts / "step_00000002.pt").read_bytes() == before["step 2"]
    state = load_checkpoint(ckpts / "step_00000002.pt")
    assert state["step"] == 2 and all_finite(state)


@pytest.mark.parametrize("log_every", [1, 100])  # caught at the log step, or only by the check before a save
def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path: Path, capsys, monkeypatch,
                                                                                 log_every: int) -> None:
    # step 2's loss is NaN (and so its update); step 1's state is good. (An lr of 1e30 used to make step 2's loss
    # NaN, but the weights its step-1 update leaves, ~1e27, are no good state either: see test_divergence.)
    from simclr_tau.methods.simclr import SimCLR

    forward, calls = SimCLR.forward, []

    def nan_loss_at_step_2(self, *views):
        loss, logs = forward(self, *views)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), logs

    monkeypatch.setattr(SimCLR, "forward", nan_loss_at_step_2)
    line = cli(tmp_path, capsys, "train.run_name=nan", "train.save_every_steps=1",
               "train.keep_last=10", f"train.log_every={log_every}")
    ckpts = tmp_path / "nan" / "checkpoints"
    assert line.startswith(f"error: non-finite loss at step 2; the last good checkpoint {ckpts / 'step_00000001.pt'} "
                           "is kept"), line
    assert "Lower optim.lr" in line and "--resume auto" in line
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000001.pt"]  # nothing saved after the divergence
    state = load_checkpoint(ckpts / "step_00000001.pt")
    assert state["step"] == 1 and all_finite(state)
    assert json.loads((tmp_path / "nan" / "summary.json").read_text())["error"] == "non-finite loss at step 2"


# ---- bad data ------------------------------------------------------------------------------------------


IMAGEFOLDER = ["data.name=imagefolder", "data.image_size=16", "data.pipeline=dataloader", "train.run_name=folder"]


def test_imagefolder_errors_for_a_missing_or_empty_data_directory(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nonexistent"
    line = cli(tmp_path, capsys, *IMAGEFOLDER, f"data.root={missing}")
    assert line.startswith(f"error: data.root={missing}: directory not found; point data.root")
    empty = tmp_path / "empty"
    empty.mkdir()
    line = cli(tmp_path, capsys, *IMAGEFOLDER, f"data.root={empty}")
    assert line.startswith(f"error: data.root={empty}: not an ImageFolder tree (root/<class>/<image>)")
    (empty / "class_a").mkdir()  # a class directory without images
    line = cli(tmp_path, capsys, *IMAGEFOLDER, f"data.root={empty}")
    assert line.startswith(f"error: data.root={empty}: not an ImageFolder tree") and "no valid file" in line.lower()


@pytest.mark.parametrize("num_workers", [0, 1])  # in-process decode, and a DataLoader worker re-raising it
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_image_fails_the_run_with_one_line_naming_the_file(tmp_path: Path, capsys, damage: str,
                                                                     num_workers: int) -> None:
    """The documented behaviour (FolderImageDataset): fail at the first read of the file, naming it."""
    paths = image_tree(tmp_path / "tree")
    bad = paths[5]
    bad.write_bytes(bad.read_bytes()[:40] if damage == "truncated" else b"this is not an image")
    line = cli(tmp_path, capsys, *IMAGEFOLDER, f"data.root={tmp_path / 'tree'}", f"data.num_workers={num_workers}")
    cause = "Out of bound read in decode_png" if damage == "truncated" else "Unsupported image file"
    assert line.startswith(f"error: {bad}: cannot decode image ({cause}"), line
    assert line.endswith("remove or re-encode the file, then --resume auto")


@pytest.mark.slow
def test_more_processes_than_samples_is_a_one_line_error_from_each_rank(tmp_path: Path) -> None:
    """A real 2-process group with 2 images: each rank must say why and exit, the launcher must fail (no hang)."""
    proc = run_proc([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--monitor-interval", "1",
                     "--master_port", str(free_port()), "-m", "simclr_tau.pretrain", TINY,
                     f"train.output_dir={tmp_path}", "data.synthetic_size=2", "train.batch_size=2"], ENV, timeout=180)
    assert proc.returncode != 0
    expected = ("error: 2 processes leave 1 sample(s) each per micro-batch of 2 (need 2): raise train.batch_size "
                "to at least 4 (the dataset has 2 images) or launch fewer processes")
    # print() writes the message and its newline separately, so the two ranks' lines may interleave on the
    # shared pipe: count the messages rather than lines
    assert proc.stderr.count(expected) == 2, proc.stderr[-3000:]
    assert "UserError" not in proc.stderr and "simclr_tau/train" not in proc.stderr  # no worker traceback


# ---- W&B unreachable -------------------------------------------------------------------------------------


def test_wandb_unreachable_continues_offline(tmp_path: Path, monkeypatch) -> None:
    """Online W&B pointed at a closed local port with a syntactically valid key: init fails after the (short)
    timeout, the run goes on with W&B offline (to `wandb sync` later) and finishes with its local record."""
    wandb = pytest.importorskip("wandb")
    import psutil

    for k, v in {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567",
                 "WANDB_ERROR_REPORTING": "false", "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
                 "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
                 "SIMCLR_TAU_WANDB_INIT_TIMEOUT": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    try:
        with pytest.warns(UserWarning, match=r"W&B unreachable .*continuing with W&B offline"):
            result = run(tiny_cfg(tmp_path, "train.run_name=wb", "train.max_steps=2", "wandb.enabled=true",
                                  "wandb.mode=online"))
    finally:
        wandb.teardown()  # stop the wandb-core service this test started
    assert result.step == 2 and not result.stopped_early
    assert logged_steps(result.run_dir) == [1, 2]
    assert (result.run_dir / "encoder.safetensors").is_file()
    assert list((result.run_dir / "wandb").glob("offline-run-*"))
    time.sleep(0.5)
    assert not [p for p in psutil.Process().children(recursive=True) if "wandb" in p.name()]


# ---- bugs keep their traceback ---------------------------------------------------------------------------


def test_a_bug_keeps_its_exception_and_traceback(tmp_path: Path, monkeypatch) -> None:
    """exit_on_user_error turns only UserError into `error: ...`; anything else is a bug and propagates."""
    from simclr_tau.cli import main
    from simclr_tau.methods.simclr import SimCLR

    def broken_forward(self, *views):  # (x1, x2, index): whatever the loader passes
        raise ZeroDivisionError("a bug inside forward")

    monkeypatch.setattr(SimCLR, "forward", broken_forward)
    with pytest.raises(ZeroDivisionError, match="a bug inside forward") as exc:
        main(["pretrain", TINY, f"train.output_dir={tmp_path}", "train.run_name=bug"])
    assert any(entry.name == "broken_forward" for entry in exc.traceback)
