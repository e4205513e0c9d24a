"""Checkpoints: one file per save, written atomically, loadable with ``torch.load(weights_only=True)``.

Why not ``accelerator.save_state``: it pickles RNG states and custom objects, and reading those back
needs ``weights_only=False``, i.e. executing whatever a checkpoint file contains. Ours holds only
tensors and plain containers (model, optimizer, step counters, RNG state as a tensor), so loading a
checkpoint can never run code, and a pickle payload is refused.

Layout: ``<run>/checkpoints/step_00001234.pt``; the newest ``train.keep_last`` are kept, and never the one just
written is pruned. A run restarted from step s (an older ``--resume CKPT``, or step 0 after a failed start) first
moves the checkpoints newer than s, an abandoned lineage, to ``checkpoints/retired-<time>/``
(:func:`retire_newer`), so that retention and ``--resume auto`` only ever see the current lineage.

A checkpoint is *good* when every floating-point tensor of its model is finite and at most :data:`MAX_ABS` in
magnitude and its optimizer state is finite (:func:`state_problem`); ``--resume auto`` skips one that is not.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from simclr_tau.errors import UserError
from simclr_tau.fileio import atomic_write

_NAME = re.compile(r"^step_(\d{8})\.pt$")

# The bound of a sane value in a model's state. A BatchNorm running_var of 1e10 is an activation std of 1e5: fp16
# overflows at 6.5e4, and healthy weights, means and variances are O(1) (weight decay and normalisation keep them
# there), so 1e10 leaves ten orders of headroom yet catches a divergence (running variances of 1e33 were seen in a
# finite-loss run) long before fp32's 3.4e38 turns it into inf / NaN. One bound for every floating-point tensor
# of the model (weights, running statistics, τ, queues); the optimizer state (Adam's squared-gradient average
# may be large) need only be finite.
MAX_ABS = 1e10


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint's file name says (``step_00001234.pt`` -> 1234)."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"not a checkpoint file name: {path}")
    return int(m.group(1))


def _float_tensors(tree: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and tree.numel():
            yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _float_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _float_tensors(v, f"{prefix}.{i}" if prefix else str(i))


@torch.no_grad()
def state_problem(tree: Any, bound: float = MAX_ABS, prefix: str = "") -> Optional[str]:
    """None if every floating-point tensor in ``tree`` (nested dicts / lists) is finite and within ``bound``,
    else what is wrong with the first that is not (``encoder.bn1.running_var reaches 1.8e+33 > 1e+10``).
    One host sync, whatever the number of tensors."""
    named = list(_float_tensors(tree, prefix))
    if not named:
        return None
    device = named[0][1].device
    amax = torch.stack([t.detach().abs().amax().float().to(device) for _, t in named]).cpu()
    bad = (~(amax <= bound)).nonzero()  # NaN compares False: bad too
    if not bad.numel():
        return None
    i = int(bad[0])
    name, value = named[i][0], float(amax[i])
    if value != value or value == float("inf"):
        return f"{name} is not finite"
    return f"{name} reaches {value:.3g} > {bound:g}"


def checkpoint_problem(state: Any) -> Optional[str]:
    """Why a loaded checkpoint is not good (see the module docstring), or None."""
    if not isinstance(state, dict):
        return None
    return state_problem(state.get("model", {}), MAX_ABS, "model") or \
        state_problem(state.get("optimizer", {}), float("inf"), "optimizer")


def _torch_save(obj: Any, tmp: Path) -> None:
    with open(tmp, "wb") as f:
        torch.save(obj, f)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash or a full disk leaves either the old file or the new one, never a half-written file; the
    temporary file is removed on failure (a SIGKILL can leave one behind: :func:`prune` removes it).
    A full disk or quota is a :class:`UserError` (the user frees space and resumes), not a traceback.
    """
    atomic_write(path, lambda tmp: _torch_save(obj, tmp), fsync=True,
                 when_full="the previous checkpoint is intact: free disk space (or lower train.keep_last), then "
                           "--resume auto")


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Load a checkpoint safely (tensors and plain containers only). Raises UserError if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as e:  # pickle.UnpicklingError for payloads, RuntimeError/EOFError for truncation
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise UserError(f"{path} was refused: it contains pickled objects beyond tensors ({first[:200]})") from None
        raise UserError(f"{path} is not a readable checkpoint (truncated or corrupt): {first[:200]}") from None


def list_checkpoints(directory: Path) -> List[Path]:
    """Checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def latest_valid_checkpoint(directory: Path) -> Optional[Path]:
    """The newest checkpoint that loads and is good; corrupt, truncated or diverged ones are skipped with a
    warning."""
    for p in reversed(list_checkpoints(directory)):
        try:
            problem = checkpoint_problem(load_checkpoint(p))
        except UserError as e:
            warnings.warn(f"skipping checkpoint: {e}", stacklevel=2)
            continue
        if problem is None:
            return p
        warnings.warn(f"skipping checkpoint: {p} has diverged ({problem})", stacklevel=2)
    return None


def retire_newer(directory: Path, step: int) -> Optional[Path]:
    """Move the checkpoints of ``directory`` newer than ``step`` (an abandoned lineage: the run restarts from
    ``step``) to ``directory/retired-<time>/``, printing one line. Returns that directory, or None if none."""
    newer = [p for p in list_checkpoints(directory) if checkpoint_step(p) > step]
    if not newer:
        return None
    retired = directory / f"retired-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while retired.exists():
        n += 1
        retired = directory / f"retired-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    retired.mkdir()
    for p in newer:
        os.replace(p, retired / p.name)
    steps = [checkpoint_step(p) for p in newer]
    print(f"restarting from step {step}: moved {len(newer)} checkpoint(s) of the abandoned attempt (steps "
          f"{steps[0]}..{steps[-1]}) to {retired}", flush=True)
    return retired


def prune(directory: Path, keep_last: int, keep: Optional[Path] = None) -> None:
    """Keep the newest ``keep_last`` checkpoints, and ``keep`` (the one just written) whatever its name; also
    remove temporary files a killed save left behind."""
    for p in list_checkpoints(directory)[:-keep_last]:
        if keep is None or p.name != Path(keep).name:
            p.unlink(missing_ok=True)
    for p in directory.glob(".step_*.pt.*.tmp"):  # called after our own save completed: none is in flight
        p.unlink(missing_ok=True)
