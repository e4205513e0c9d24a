"""SIGTERM / SIGINT to the whole process group (``scancel``, ``docker stop``, ``kill -TERM -- -PGID``, Ctrl-C) of a
run whose DataLoader workers are alive: the run finishes the step, saves, exits 0 and resumes bit-exactly.

Real processes: the run is started in its own session, so its process group is the run and its workers; the
workers' being alive when the signal is sent is checked, not assumed.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from procs import BN_FREE, ENV, TINY, Training, image_tree, logged_steps, run_proc
from simclr_tau.config import load_config
from simclr_tau.train.checkpoint import list_checkpoints, load_checkpoint
from simclr_tau.train.pretrain import run

# 256 images, batch 16: 16 steps an epoch, so both workers are still prefetching when the signal comes
WORKERS = ["data.pipeline=dataloader", "data.num_workers=2", "data.synthetic_size=256", "train.epochs=2",
           "train.deterministic=true", *BN_FREE]
TOTAL = 32


def final_weights(run_dir: Path) -> dict:
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = run(load_config(TINY, [f"train.output_dir={out}", "train.run_name=full", *WORKERS]))
    assert result.step == TOTAL
    return result.run_dir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_saves_at_the_stop_step_and_resumes_bit_exactly(
        tmp_path: Path, uninterrupted: Path, sig: int) -> None:
    import psutil

    run_dir = tmp_path / "stopped"
    with Training(tmp_path, "train.run_name=stopped", *WORKERS) as training:
        training.wait_for_step(run_dir, 3)
        workers = psutil.Process(training.proc.pid).children()
        assert len(workers) == 2 and all(os.getpgid(w.pid) == training.proc.pid for w in workers)
        os.killpg(training.proc.pid, sig)  # the group: the main process and both workers
        rc = training.wait()
    err, out = training.stderr.read_text(), training.stdout.read_text()
    assert rc == 0, err[-3000:]
    assert "killed by signal" not in err and "Traceback" not in err, err[-3000:]
    m = re.search(r"stopped by signal at step (\d+)", out)
    assert m, out
    stop = int(m.group(1))
    assert 3 <= stop < TOTAL and logged_steps(run_dir)[-1] == stop
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")][-1] == f"step_{stop:08d}.pt"
    assert load_checkpoint(run_dir / "checkpoints" / f"step_{stop:08d}.pt")["step"] == stop

    resumed = run(load_config(TINY, [f"train.output_dir={tmp_path}", "train.run_name=stopped", *WORKERS]),
                  resume="auto")
    assert resumed.step == TOTAL and not resumed.stopped_early
    a, b = final_weights(uninterrupted), final_weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_run_that_fails_with_live_workers_still_exits(tmp_path: Path) -> None:
    """The workers drop others' SIGTERM but obey their parent's: at interpreter exit multiprocessing ends the
    workers an error left alive with SIGTERM and joins them (a worker ignoring it hung this exit)."""
    bad = image_tree(tmp_path / "tree", per_class=32)[-12]
    bad.write_bytes(b"this is not an image")
    proc = run_proc([sys.executable, "-m", "simclr_tau.pretrain", TINY, f"train.output_dir={tmp_path}",
                     "data.name=imagefolder", f"data.root={tmp_path / 'tree'}", "data.image_size=16",
                     "data.pipeline=dataloader", "data.num_workers=2"], ENV, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: cannot decode image")


class _SignalState(Dataset):
    """Item i: what the worker's init left: SIGINT ignored, SIGTERM blocked, the composed init function run."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        return torch.tensor([signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
                             signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []),
                             os.environ.get("SIMCLR_TAU_INIT_RAN") == "1"])


def _mark_init(worker_id: int) -> None:
    os.environ["SIMCLR_TAU_INIT_RAN"] = "1"  # in the worker process only


def test_the_worker_init_ignores_the_stop_signals_and_runs_the_existing_init_function() -> None:
    from simclr_tau.train.signals import IgnoreStopSignals, stop_signals_blocked

    # a known handler first: a test runner started as a background job inherits SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        loader = DataLoader(_SignalState(), batch_size=2, num_workers=1, worker_init_fn=IgnoreStopSignals(_mark_init))
        with stop_signals_blocked():
            batches = iter(loader)
        assert next(batches).all()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # this process is unchanged
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.signal(signal.SIGINT, previous)
