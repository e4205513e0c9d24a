"""Subprocess helpers of the test suite: real processes (torchrun groups included) that never outlive a test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

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
