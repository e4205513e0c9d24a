"""One writer per run directory (issue 18, item 3): a second ``pretrain ... --resume auto`` on a directory in use
is refused with one line naming the holder (pid, host) and exit 2, and the first run goes on unharmed; a lock left
by a dead process is taken over with a message; a torchrun group takes it once, on its main process.

The first writer is a real process held at step 2 until the test lets it go, so the second always meets it alive.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procs import free_port, kill_tree, run_proc
from simclr_tau.config import load_config
from simclr_tau.errors import UserError
from simclr_tau.train.checkpoint import list_checkpoints
from simclr_tau.train.pretrain import run
from simclr_tau.train.run_lock import LOCK_NAME, RunLock, pid_alive

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
HOST = socket.gethostname()

# ``python -c HELD ARGV...``: pretrain, pausing inside optimizer step 2 (step 1 logged and saved) until the
# file $GO exists; $PAUSED appears when it pauses
HELD = """
import os, sys, time
from simclr_tau.methods.simclr import SimCLR
after_step = SimCLR.after_step
def held(self, step):
    after_step(self, step)
    if step == 1:
        open(os.environ["PAUSED"], "w").close()
        while not os.path.exists(os.environ["GO"]):
            time.sleep(0.02)
SimCLR.after_step = held
from simclr_tau.pretrain import main
main(sys.argv[1:])
"""


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the first writer ended (rc {proc.returncode}) before pausing:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def test_a_second_writer_is_refused_and_the_first_finishes_unharmed(tmp_path: Path) -> None:
    run_dir = tmp_path / "shared"
    paused, go = tmp_path / "paused", tmp_path / "go"
    args = [TINY, f"train.output_dir={tmp_path}", "train.run_name=shared", "train.epochs=2", "train.save_every_steps=1"]
    first = subprocess.Popen([sys.executable, "-c", HELD, *args], env={**ENV, "PAUSED": str(paused), "GO": str(go)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(paused, first)
        holder = json.loads((run_dir / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] == HOST
        ckpts_before = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
        # the same command again, as a requeued job would run it
        second = run_proc([sys.executable, "-m", "simclr_tau.pretrain", *args, "--resume", "auto"], ENV)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: run directory {run_dir} is in use by pid {first.pid} on host {HOST}, "
                                    "since "), second.stderr[-3000:]
        assert "choose another train.run_name" in lines[-1] and "Traceback" not in second.stderr
        assert first.poll() is None  # the refusal came while the first writer was alive ...
        assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ckpts_before  # ... and touched nothing
        assert logged_steps(run_dir) == [1] and ckpts_before == ["step_00000001.pt"]  # paused inside step 2
        go.touch()
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            kill_tree(first)
    assert first.returncode == 0, err[-3000:]
    assert logged_steps(run_dir) == list(range(1, 9))  # every step once: nothing interleaved
    assert (run_dir / "encoder.safetensors").is_file()
    assert (run_dir / LOCK_NAME).read_text() == ""  # released at the end


def test_the_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path: Path, capsys) -> None:
    """SIGKILL leaves run.lock naming the dead writer; --resume auto takes it over and finishes the run."""
    run_dir = tmp_path / "killed"
    paused, go = tmp_path / "paused", tmp_path / "go"
    args = [TINY, f"train.output_dir={tmp_path}", "train.run_name=killed", "train.epochs=2", "train.save_every_steps=1"]
    first = subprocess.Popen([sys.executable, "-c", HELD, *args], env={**ENV, "PAUSED": str(paused), "GO": str(go)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(paused, first)
        os.killpg(first.pid, signal.SIGKILL)
        assert first.wait(timeout=60) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            kill_tree(first)
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == first.pid
    capsys.readouterr()
    result = run(load_config(TINY, [f"train.output_dir={tmp_path}", "train.run_name=killed", "train.epochs=2",
                                    "train.save_every_steps=1"]), resume="auto")
    out = capsys.readouterr().out
    assert f"took over the stale lock {run_dir / LOCK_NAME} of pid {first.pid} on host {HOST}" in out, out
    assert result.step == 8 and logged_steps(run_dir) == list(range(1, 9))
    assert (run_dir / LOCK_NAME).read_text() == ""


def test_a_stale_lock_naming_a_dead_pid_is_taken_over(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "stale"
    run_dir.mkdir()
    pid = dead_pid()
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": HOST, "started": 1_700_000_000}))
    result = run(load_config(TINY, [f"train.output_dir={tmp_path}", "train.run_name=stale", "train.max_steps=2"]))
    out = capsys.readouterr().out
    assert f"took over the stale lock {run_dir / LOCK_NAME} of pid {pid} on host {HOST}, since 2023-11-" in out, out
    assert result.step == 2 and (run_dir / LOCK_NAME).read_text() == ""


def test_a_run_that_raises_releases_the_lock(tmp_path: Path) -> None:
    """A UserError inside the run (here: an explicit --resume of a missing file) must not leave the directory
    locked for the next run of the same process."""
    with pytest.raises(UserError, match="no such checkpoint file"):
        run(load_config(TINY, [f"train.output_dir={tmp_path}", "train.run_name=r"]), resume=str(tmp_path / "nope.pt"))
    lock = RunLock(tmp_path / "r").acquire()  # free again
    lock.release()


@pytest.mark.parametrize("holder, refused", [
    ("alive", True), ("dead", False), ("other-host", True),
], ids=["live-holder-refused", "dead-holder-taken-over", "other-host-refused"])
def test_without_kernel_locks_the_file_decides(tmp_path: Path, monkeypatch, capsys, holder: str,
                                              refused: bool) -> None:
    """A filesystem that refuses flock (ENOLCK): a live pid on this host, or any pid on another host, refuses;
    a dead pid on this host is taken over."""
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid = {"alive": sleeper.pid, "dead": dead_pid(), "other-host": sleeper.pid}[holder]
        host = "elsewhere.example" if holder == "other-host" else HOST
        tmp_path.joinpath(LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host}))
        if refused:
            with pytest.raises(UserError) as exc:
                RunLock(tmp_path).acquire()
            assert str(exc.value).startswith(f"run directory {tmp_path} is in use by pid {pid} on host {host} (")
            assert str(exc.value).endswith(f"this filesystem has no locks: delete {tmp_path / LOCK_NAME} if no run "
                                           "holds it")
        else:
            lock = RunLock(tmp_path).acquire()
            assert f"took over the stale lock {tmp_path / LOCK_NAME} of pid {pid}" in capsys.readouterr().out
            assert json.loads(tmp_path.joinpath(LOCK_NAME).read_text())["pid"] == os.getpid()
            lock.release()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.slow
def test_a_torchrun_group_takes_the_lock_once_and_is_refused_as_a_whole(tmp_path: Path) -> None:
    """While another writer holds the directory, both ranks of a 2-process group stop with the holder's line
    (no hang); once it is free, the group runs: only the main process locked it (a second rank locking it
    too would find it held)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--monitor-interval", "1",
           "--master_port", str(free_port()), "-m", "simclr_tau.pretrain", TINY, f"train.output_dir={tmp_path}",
           "train.run_name=ddp", "train.max_steps=2"]
    lock = RunLock(tmp_path / "ddp").acquire()  # this test process is the other writer
    try:
        refused = run_proc(cmd, ENV, timeout=180)
    finally:
        lock.release()
    assert refused.returncode != 0
    expected = f"error: run directory {tmp_path / 'ddp'} is in use by pid {os.getpid()} on host {HOST}"
    assert refused.stderr.count(expected) == 2, refused.stderr[-3000:]  # one line from each rank
    assert not (tmp_path / "ddp" / "metrics.jsonl").exists()
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    ok = run_proc(cmd, ENV, timeout=180)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert logged_steps(tmp_path / "ddp") == [1, 2]
