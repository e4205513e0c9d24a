"""Helpers of the tests that run real processes (torchrun groups included), which never outlive a test, and
the small inputs they train on."""

from __future__ import annotations

import os
import signal
import socket
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "synthetic_tiny.yaml")  # a seconds-long run
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}


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


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl; a last line torn by a kill mid-write is ignored."""
    path = run_dir / "metrics.jsonl"
    steps = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except ValueError:
                pass
    return steps


class Training:
    """``[launcher] -m simclr_tau.pretrain TINY ...`` in its own session (its own process group); killed with all it started if still
    alive at exit."""

    def __init__(self, tmp_path: Path, *overrides: str, launcher: tuple = (sys.executable,)) -> None:
        self.stdout, self.stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(
                [*launcher, "-m", "simclr_tau.pretrain", TINY, f"train.output_dir={tmp_path}", *overrides],
                env=ENV, stdout=out, stderr=err, start_new_session=True)

    def wait_for_step(self, run_dir: Path, step: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not logged_steps(run_dir) or logged_steps(run_dir)[-1] < step:
            if self.proc.poll() is not None:
                pytest.fail(f"training ended (rc {self.proc.returncode}) before step {step}:\n"
                            f"{self.stderr.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"step {step} not logged within {timeout} s")
            time.sleep(0.02)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"training did not exit within {timeout} s")

    def __enter__(self) -> "Training":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            kill_tree(self.proc)


def image_tree(root: Path, per_class: int = 8) -> list[Path]:
    """An ImageFolder tree ``root/{a,b}/<i>.png`` of random 16 px RGB images (seeded); the paths, class a first."""
    import torch
    from torchvision.io import encode_png

    g = torch.Generator().manual_seed(0)
    paths = []
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=g)
            paths.append(root / c / f"{i}.png")
            paths[-1].write_bytes(bytes(encode_png(img).numpy()))
    return paths
