"""Subprocess helpers of the test suite: real processes (torchrun groups included) that never outlive a test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in its own session, all its descendants and its group. The descendants are
    killed one by one: torchrun starts each worker in a session of its own, out of reach of killpg."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_proc(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command in its own session; on timeout kill it and everything it started, and fail the test."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (a hang?): {' '.join(args)}\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)

# A BatchNorm-free model: without SyncBN (GPU-only in torch), BN statistics would differ between one
# process with 2N samples and two with N each, so exact multi-process equivalence needs no BN.
BN_FREE = [
    "model.backbone=vit_tiny_patch16_224",
    "model.backbone_kwargs={img_size: 16, patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.small_stem=false",
    "model.proj_bn=false",
]


def pretrain_one_and_two_processes(config: str, output_dir: Path, overrides: list[str], repo: Path) -> None:
    """Pretrain ``config`` + ``overrides`` twice: one process (run ``one``) and a real 2-process gloo group
    through torchrun (run ``two``), both under ``output_dir``; asserts both exit 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(repo)}
    cmd = ["-m", "simclr_tau.pretrain", config, f"train.output_dir={output_dir}", *overrides]
    one = run_proc([sys.executable, *cmd, "train.run_name=one"], env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_proc([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), *cmd, "train.run_name=two"], env)
    assert two.returncode == 0, two.stderr[-3000:]
