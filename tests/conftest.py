"""Shared test setup.

Tests use tiny tensors: one intra-op thread is faster than two (no thread hand-off per op) and keeps the
suite quick on a busy machine.
"""

import torch

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path_factory, monkeypatch) -> None:
    """Caches a test writes (the imagefolder tensor cache) go to a temporary XDG_CACHE_HOME, never ~/.cache;
    subprocesses inherit it through the environment."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
