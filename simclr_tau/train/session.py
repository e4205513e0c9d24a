"""A run's life outside the optimizer step, shared by pretraining (:mod:`simclr_tau.train.pretrain`) and
distillation (:mod:`simclr_tau.train.distill`): the Accelerator, the run directory and ``--resume``,
restoring a checkpoint, the speed options, the online-kNN closure and the result of a run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from simclr_tau.errors import UserError
from simclr_tau.train.checkpoint import checkpoint_problem, latest_valid_checkpoint, load_checkpoint, retire_newer
from simclr_tau.train.optim import build_optimizer, scaled_lr
from simclr_tau.train.run_lock import NoLock, RunLock


@dataclass
class RunResult:
    """What a run returns: its directory, the last step, whether a signal stopped it before ``total_steps``,
    and whether this is the main process (the one that prints the end-of-run summary)."""

    run_dir: Path
    step: int
    stopped_early: bool = False
    total_steps: int = 0
    is_main: bool = True


def start_accelerator(tc: Any) -> Any:
    """An Accelerator (CPU when no GPU), seeded so every process builds the same initial weights; first, what
    the run needs of this machine (:func:`~simclr_tau.config.check_run_environment`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from simclr_tau.config import check_run_environment

    check_run_environment(tc)

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=tc.mixed_precision)
    set_seed(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)
    return accelerator


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """``--resume``: 'auto' (newest valid checkpoint of ``run_dir``, or None), a run directory or a file."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_valid_checkpoint(run_dir / "checkpoints")  # None: fresh start
    p = Path(resume)
    if p.is_dir():
        found = latest_valid_checkpoint(p / "checkpoints" if (p / "checkpoints").is_dir() else p)
        if found is None:
            raise UserError(f"--resume {p}: no valid checkpoint in it")
        return found
    if not p.is_file():
        raise UserError(f"--resume {p}: no such checkpoint file or run directory")
    return p


def lock_run(run_dir: Path, accelerator: Any) -> Any:
    """The main process takes ``run_dir``'s :class:`~simclr_tau.train.run_lock.RunLock` for the whole group;
    if another run holds it, every process raises the same UserError (naming the holder). Others get a
    :class:`~simclr_tau.train.run_lock.NoLock`."""
    lock: Any = NoLock()
    refused: Optional[str] = None
    if accelerator.is_main_process:
        try:
            lock = RunLock(run_dir).acquire()
        except UserError as e:
            refused = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([refused])[0]
    if refused is not None:
        raise UserError(refused)
    return lock


def open_run(run_dir: Path, run_name: str, resume: Optional[str], accelerator: Any) -> Tuple[Optional[Path], Any]:
    """Lock the run directory (:func:`lock_run`), resolve ``--resume`` and refuse to write a fresh run over an
    old one. Returns (the checkpoint or None, the lock: a context manager the run holds until its end)."""
    lock = lock_run(run_dir, accelerator)
    try:
        ckpt = resolve_resume(resume, run_dir)
        if ckpt is None and (run_dir / "metrics.jsonl").exists():
            if resume != "auto":
                raise UserError(f"run directory {run_dir} already holds a run; resume it with --resume auto "
                                "or choose another train.run_name")
            if accelerator.is_main_process:  # killed before its first checkpoint: redo it from step 0
                print(f"no valid checkpoint in {run_dir / 'checkpoints'}: restarting {run_name} from step 0",
                      flush=True)
    except BaseException:
        lock.release()
        raise
    # every process has looked at the run directory before the main one writes to it (else a slower
    # process would find the new metrics.jsonl and take this fresh run for an old one)
    accelerator.wait_for_everyone()
    return ckpt, lock


def truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (they belong to the interrupted attempt being redone), and a
    half-written last line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    path.write_text("".join(line + "\n" for line in keep))


def last_metric(run_dir: Path, key: str) -> Optional[float]:
    value = None
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if key in row:
                value = row[key]
    return value


def load_training_state(core: torch.nn.Module, optimizer: Any, state: Any, ckpt: Path,
                        not_saved: Sequence[str] = ()) -> None:
    """Load a checkpoint's model and optimizer state; a checkpoint of another model is a UserError listing
    the mismatched keys (strict loading would raise a RuntimeError traceback). Keys starting with a
    prefix in ``not_saved`` (a frozen teacher) are not expected in the checkpoint."""
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "optimizer" not in state \
            or "step" not in state:
        raise UserError(f"--resume {ckpt}: not a training checkpoint (needs 'model', 'optimizer' and 'step'); "
                        "pass a run directory or a checkpoints/step_*.pt file")
    own = {k: v for k, v in core.state_dict().items() if not k.startswith(tuple(not_saved))}
    theirs = state["model"]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shape = sorted(k for k in set(own) & set(theirs) if isinstance(own[k], torch.Tensor)
                   and (not isinstance(theirs[k], torch.Tensor) or own[k].shape != theirs[k].shape))
    if missing or unexpected or shape:
        parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape))
                 if keys]
        raise UserError(f"--resume {ckpt} does not match this model ({'; '.join(parts)}): resume with the "
                        "config the checkpoint was trained with")
    core.load_state_dict(theirs, strict=not not_saved)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:  # torch: "loaded state dict contains a parameter group that doesn't match"
        raise UserError(f"--resume {ckpt}: its optimizer state does not match this config's optimizer "
                        f"({str(e).splitlines()[0][:150]}): resume with the config the checkpoint was trained "
                        "with") from None


def restore(core: torch.nn.Module, optimizer: Any, ckpt: Optional[Path], accelerator: Any,
            not_saved: Sequence[str] = ()) -> Tuple[int, Optional[str], Optional[Dict[str, Any]]]:
    """Load ``ckpt`` (if any) into the model and optimizer. Returns (start step, W&B run id, the loss window of
    the log row in progress: :class:`~simclr_tau.train.loop.LossWindow`; None in older checkpoints)."""
    if ckpt is None:
        return 0, None, None
    state = load_checkpoint(ckpt)
    problem = checkpoint_problem(state)
    if problem is not None:
        raise UserError(f"--resume {ckpt}: this checkpoint has diverged ({problem}); resume from an earlier one")
    load_training_state(core, optimizer, state, ckpt, not_saved)
    if accelerator.is_main_process:
        print(f"resumed from {ckpt} at step {int(state['step'])}", flush=True)
    window = state.get("log_window")
    return int(state["step"]), state.get("wandb_id") or None, window if isinstance(window, dict) else None


_ABSENT = object()  # a key one of two configs does not have


def _shown(value: Any) -> str:
    return "null" if value is None else "<absent>" if value is _ABSENT else str(value)


def config_changes(old_text: str, new_text: str) -> List[str]:
    """``key: old -> new`` for each key (flattened, ``a.b``) whose value differs between two config YAMLs."""
    import yaml

    from simclr_tau.config import flatten

    old, new = flatten(yaml.safe_load(old_text) or {}), flatten(yaml.safe_load(new_text) or {})
    keys = list(new) + [k for k in old if k not in new]
    return [f"{k}: {_shown(old.get(k, _ABSENT))} -> {_shown(new.get(k, _ABSENT))}" for k in keys
            if old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def _with_resolved_defaults(text: str, image_size: Optional[int]) -> str:
    """A saved config as a run of this version writes it: the run-time defaults an older version left
    ``null`` filled in (the same data resolve them to the same values), so they do not count as changes."""
    import yaml
    from omegaconf import OmegaConf

    from simclr_tau.config import resolve_defaults, to_yaml

    try:
        return to_yaml(resolve_defaults(OmegaConf.create(yaml.safe_load(text) or {}), image_size))
    except Exception:  # not a config this version can read: compare it as it is
        return text


def keep_changed_configs(run_dir: Path, files: Dict[str, str], start_step: int,
                         image_size: Optional[int] = None) -> List[str]:
    """Before a resumed run overwrites its config files (``files``: name -> new text): keep each one whose
    values changed as ``<stem>.<start_step>.yaml`` (the config the run had up to that step; ``.<n>`` added if
    taken) and print one line with the changed keys (those of the first changed file). ``image_size``: the
    run's, to resolve an older file's ``null`` defaults before comparing. Returns the kept names."""
    kept, changes = [], []
    for name, text in files.items():
        path = run_dir / name
        if not path.is_file():
            continue
        diff = config_changes(_with_resolved_defaults(path.read_text(), image_size), text)
        if not diff:
            continue
        target, n = run_dir / f"{path.stem}.{start_step}{path.suffix}", 0
        while target.exists():
            n += 1
            target = run_dir / f"{path.stem}.{start_step}.{n}{path.suffix}"
        path.rename(target)
        kept.append(target.name)
        changes = changes or diff
    if kept:
        print(f"config changed on resume at step {start_step}: {'; '.join(changes)} "
              f"(the previous config is kept as {', '.join(kept)})", flush=True)
    return kept


def write_run_files(run_dir: Path, files: Dict[str, str], resume: Optional[str], start_step: int,
                    image_size: Optional[int] = None) -> None:
    """Create the run directory with ``files`` (name -> text); on resume, cut metrics.jsonl at ``start_step``
    and keep the previous config files whose values changed (:func:`keep_changed_configs`). Checkpoints newer
    than ``start_step`` belong to an abandoned attempt: they are retired
    (:func:`~simclr_tau.train.checkpoint.retire_newer`), so the run's lineage is the one it continues."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is not None:
        keep_changed_configs(run_dir, files, start_step, image_size)
    for name, text in files.items():
        (run_dir / name).write_text(text)
    if resume is not None:
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
    retire_newer(run_dir / "checkpoints", start_step)


def speed_up(method: torch.nn.Module, tc: Any) -> torch.nn.Module:
    """Apply the speed options of ``train`` to a freshly built (not yet prepared) method, in place.

    ``channels_last``: parameters and buffers in NHWC (the step converts the images to match), which lets
    oneDNN (CPU) and cuDNN (tensor cores) pick their fast convolution kernels; the arithmetic is the same.
    ``compile``: ``nn.Module.compile()`` on every timm backbone inside the method (encoder, key encoder,
    student, teacher): the module keeps its state-dict keys, so checkpoints and exports are unchanged.
    """
    if tc.channels_last:
        method.to(memory_format=torch.channels_last)
    if tc.compile:
        backbones = [m for m in method.modules() if hasattr(m, "forward_features")]  # timm models
        for m in backbones:
            m.compile()
    return method


def online_knn_fn(cfg: Any, accelerator: Any, encoder: torch.nn.Module, image_size: int, channels: int,
                  mean: List[float], std: List[float]) -> Callable[[], Dict[str, float]]:
    """A function returning the current encoder's kNN top-1/top-5 (memory bank: a train subset)."""
    cache: Dict[str, Any] = {}

    def evaluate() -> Dict[str, float]:
        from simclr_tau.data.augment import eval_transform
        from simclr_tau.data.datasets import build_eval_datasets
        from simclr_tau.evaluation.knn import online_knn

        if not cache:
            cache["train"], cache["test"] = build_eval_datasets(cfg.data)
            cache["tf"] = eval_transform(image_size, channels, mean, std)
        return online_knn(encoder, cache["train"], cache["test"], cache["tf"], list(cfg.eval.knn_k),
                          list(cfg.eval.knn_t), cfg.eval.online_knn_subset, accelerator, cfg.eval.batch_size,
                          cfg.train.seed)

    return evaluate


def prepare_method(method: torch.nn.Module, cfg: Any, accelerator: Any) -> Tuple[Any, Any, torch.nn.Module]:
    """A freshly built method made ready to train: speed options, SyncBatchNorm (``model.sync_bn`` with
    several processes), its optimizer (τ parameters in their own group), ``accelerator.prepare``.
    Returns (prepared method, optimizer, the unwrapped method)."""
    tc = cfg.train
    speed_up(method, tc)
    if cfg.model.sync_bn and accelerator.num_processes > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    optimizer = build_optimizer(cfg.optim, method, cfg.temperature.lr_scale, scaled_lr(cfg.optim, tc.batch_size))
    method, optimizer = accelerator.prepare(method, optimizer)
    return method, optimizer, accelerator.unwrap_model(method)
