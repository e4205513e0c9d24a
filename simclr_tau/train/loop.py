"""The training loop shared by pretraining (:mod:`simclr_tau.train.pretrain`) and distillation
(:mod:`simclr_tau.distill`): run directory and resume, the optimizer step, logging, online kNN,
checkpoints, signals and the non-finite guard. Each caller builds its data, method and optimizer and
hands them to a :class:`Trainer`.

Per optimizer step:

    before_step(step) (τ schedule, MoCo momentum) -> lr(step) -> grad_accum x (forward, backward)
    -> clip -> optimizer.step -> after_step(step) (τ bound projection, EMA update) -> log / checkpoint

The loss and τ stay on the device between log steps (no host sync inside a step): a non-finite loss is
recorded on the device and checked at the next log or save, and a diverged model is never checkpointed.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from simclr_tau.errors import UserError
from simclr_tau.temperature import Temperature
from simclr_tau.tracking import RunRecord
from simclr_tau.train.checkpoint import (
    atomic_save,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune,
)
from simclr_tau.train.optim import lr_at, scaled_lr, set_lr


class StopFlag:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit cleanly (preemption, Ctrl-C)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


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


def open_run(run_dir: Path, run_name: str, resume: Optional[str], accelerator: Any) -> Optional[Path]:
    """Resolve ``--resume`` and refuse to write a fresh run over an old one. Returns the checkpoint or None."""
    ckpt = resolve_resume(resume, run_dir)
    if ckpt is None and (run_dir / "metrics.jsonl").exists():
        if resume != "auto":
            raise UserError(f"run directory {run_dir} already holds a run; resume it with --resume auto "
                            "or choose another train.run_name")
        if accelerator.is_main_process:  # killed before its first checkpoint: redo it from step 0
            print(f"no valid checkpoint in {run_dir / 'checkpoints'}: restarting {run_name} from step 0", flush=True)
    # every process has looked at the run directory before the main one writes to it (else a slower
    # process would find the new metrics.jsonl and take this fresh run for an old one)
    accelerator.wait_for_everyone()
    return ckpt


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
            not_saved: Sequence[str] = ()) -> Tuple[int, Optional[str]]:
    """Load ``ckpt`` (if any) into the model and optimizer. Returns (start step, W&B run id)."""
    if ckpt is None:
        return 0, None
    state = load_checkpoint(ckpt)
    load_training_state(core, optimizer, state, ckpt, not_saved)
    if accelerator.is_main_process:
        print(f"resumed from {ckpt} at step {int(state['step'])}", flush=True)
    return int(state["step"]), state.get("wandb_id") or None


def write_run_files(run_dir: Path, files: Dict[str, str], resume: Optional[str], start_step: int) -> None:
    """Create the run directory with ``files`` (name -> text); on resume, cut metrics.jsonl at ``start_step``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (run_dir / name).write_text(text)
    if resume is not None:
        truncate_metrics(run_dir / "metrics.jsonl", start_step)


def stop_nonfinite(record: RunRecord, step: int, ckpt_dir: Path, what: str = "non-finite loss at") -> None:
    """Stop a diverged run; ``step`` is numbered as in metrics.jsonl (optimizer steps done)."""
    record.update_summary({"error": f"{what} step {step}"})
    record.close()
    kept = list_checkpoints(ckpt_dir)
    kept_msg = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was saved before it"
    raise UserError(
        f"{what} step {step}; {kept_msg}. "
        "Lower optim.lr, raise temperature.tau_min, or set optim.grad_clip, then --resume auto"
    )


def any_process(accelerator: Any, flag: bool) -> bool:
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


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


def to_device(batch: Any, device: torch.device, channels_last: bool) -> List[torch.Tensor]:
    """Move a micro-batch to ``device``; 4-d image tensors in channels-last layout when asked."""
    out = []
    for t in batch:
        t = t.to(device, non_blocking=True)
        out.append(t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t)
    return out


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


class Trainer:
    """Runs the optimizer steps of a prepared ``method`` (``method(*micro_batch) -> (loss, logs)``).

    ``core`` (the unwrapped method) provides ``before_step(step)``, ``after_step(step)``, ``observe(metric)``
    and, optionally, ``last_tau`` (per-sample τ of the last batch, for a histogram). Checkpoints hold the
    state_dict keys not starting with ``not_saved`` (a frozen teacher lives in its own files).
    """

    def __init__(self, cfg: Any, accelerator: Any, method: torch.nn.Module, optimizer: Any, record: RunRecord,
                 run_dir: Path, run_name: str, steps_per_epoch: int, total_steps: int,
                 online_eval: Optional[Callable[[], Dict[str, float]]] = None, not_saved: Sequence[str] = (),
                 data_metrics: Optional[Callable[..., Dict[str, float]]] = None,
                 postfix_keys: Sequence[str] = ("train/loss", "train/tau", "train/tau_mean", "train/images_per_s")):
        self.cfg, self.tc, self.accelerator = cfg, cfg.train, accelerator
        self.method, self.optimizer, self.record = method, optimizer, record
        self.core = accelerator.unwrap_model(method)
        self.run_dir, self.run_name, self.ckpt_dir = run_dir, run_name, run_dir / "checkpoints"
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        self.online_eval, self.not_saved, self.postfix_keys = online_eval, tuple(not_saved), tuple(postfix_keys)
        self.data_metrics = data_metrics  # e.g. a mixture's realized source frequencies
        self.peak_lr = scaled_lr(cfg.optim, self.tc.batch_size)
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
        self.first_bad = torch.full((), -1, dtype=torch.long, device=accelerator.device)  # first non-finite step
        self.temperatures = [m for m in self.core.modules() if isinstance(m, Temperature)]
        self.health_warned: set = set()  # a stuck τ is reported once per module

    # ---- non-finite guard and checkpoints -----------------------------------------------------
    def first_bad_step(self) -> int:
        """The first step (1-based, as in metrics.jsonl) whose loss was non-finite on any process, or -1."""
        bad = self.first_bad.reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.gather(bad)
        bad = bad[bad >= 0]
        return int(bad.min().item()) + 1 if bad.numel() else -1  # a host sync: only at log / save time

    def save(self, step: int) -> None:
        # never checkpoint a diverged model: the last checkpoint on disk stays the last good one
        bad = self.first_bad_step()
        if bad > 0:
            stop_nonfinite(self.record, bad, self.ckpt_dir)
        state = {k: v for k, v in self.core.state_dict().items() if not k.startswith(self.not_saved)}
        finite = [torch.isfinite(t).all() for t in state.values()
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]  # (not a τ schedule's extra state)
        if not bool(torch.stack(finite).all()):
            stop_nonfinite(self.record, step, self.ckpt_dir, what="non-finite weights after")
        if self.accelerator.is_main_process:
            atomic_save({"model": state, "optimizer": self.optimizer.state_dict(), "step": step,
                         "epoch": step / self.steps_per_epoch, "run_name": self.run_name,
                         "wandb_id": self.record.wandb_id or ""},
                        checkpoint_path(self.ckpt_dir, step))
            prune(self.ckpt_dir, self.tc.keep_last)
        self.accelerator.wait_for_everyone()

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, start_step: int, epoch_batches: Callable[[int, int], Iterable[List[Tuple[torch.Tensor, ...]]]]
            ) -> Tuple[int, bool]:
        """Train from ``start_step`` to the end. ``epoch_batches(epoch, skip_steps)`` yields, per optimizer
        step, this process's micro-batches. Returns (last step, stopped early by a signal)."""
        from tqdm.auto import tqdm

        tc, acc, core, method, optimizer = self.tc, self.accelerator, self.core, self.method, self.optimizer
        spe, total = self.steps_per_epoch, self.total_steps
        loss_sum = torch.zeros((), device=acc.device)
        step, stopped_early = start_step, False
        bar = tqdm(total=total, initial=start_step, disable=not (acc.is_main_process and tc.progress), unit="step",
                   dynamic_ncols=True, desc=self.run_name[:40])
        t_log, last_log_step = time.perf_counter(), step
        method.train()
        with StopFlag() as stop:
            while step < total and not stopped_early:
                epoch = step // spe
                for micro_batches in epoch_batches(epoch, step - epoch * spe):
                    core.before_step(step)
                    set_lr(optimizer, lr_at(step, total, self.warmup_steps, self.peak_lr, self.cfg.optim.final_lr_ratio))
                    for i, batch in enumerate(micro_batches):
                        batch = to_device(batch, acc.device, tc.channels_last)
                        last = i == len(micro_batches) - 1
                        with acc.no_sync(method) if not last else contextlib.nullcontext(), acc.autocast():
                            loss, logs = method(*batch)
                            acc.backward(loss / len(micro_batches))
                        loss_sum += loss.detach() / len(micro_batches)
                        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss.detach()),
                                                     torch.full_like(self.first_bad, step), self.first_bad)
                    if self.cfg.optim.grad_clip is not None:
                        acc.clip_grad_norm_(method.parameters(), self.cfg.optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    core.after_step(step)
                    step += 1
                    bar.update(1)
                    end_of_epoch = step % spe == 0
                    sync_point = step % tc.log_every == 0 or end_of_epoch or step == total
                    # A signal may reach the processes at different steps: they agree on stopping at a common
                    # log step (one small collective there), so that all of them save at the same step.
                    stopping = stop.requested if acc.num_processes == 1 else sync_point and any_process(acc, stop.requested)
                    if sync_point or stopping:
                        self._log(step, loss_sum, logs, time.perf_counter() - t_log, step - last_log_step, bar)
                        loss_sum.zero_()
                        t_log, last_log_step = time.perf_counter(), step
                    if (end_of_epoch and self.online_eval is not None and self.cfg.eval.online_knn_every
                            and (step // spe) % self.cfg.eval.online_knn_every == 0):
                        knn = self.online_eval()
                        # online_knn/...: a train subset as memory bank, distinct from the final `simclr-tau knn`
                        self.record.log({f"online_{k}": v for k, v in knn.items()}, step, step / spe)
                        core.observe(next(iter(knn.values())))  # a plateau schedule monitors the first top-1
                    if ((end_of_epoch and (step // spe) % tc.save_every_epochs == 0) or step == total
                            or (tc.save_every_steps and step % tc.save_every_steps == 0) or stopping):
                        self.save(step)
                    if stopping:
                        stopped_early = True
                        if acc.is_main_process:
                            print(f"stopped by signal at step {step}; checkpoint saved in {self.ckpt_dir}. "
                                  f"Resume with --resume auto (train.run_name={self.run_name})", flush=True)
                        break
                    if step >= total:
                        break
        bar.close()
        return step, stopped_early

    def _log(self, step: int, loss_sum: torch.Tensor, logs: Dict[str, Any], seconds: float, n_steps: int,
             bar: Any) -> None:
        bad = self.first_bad_step()  # the one host sync of a logging step
        if bad > 0:
            stop_nonfinite(self.record, bad, self.ckpt_dir)
        metrics = {
            # mean over processes = the loss of the global batch
            "train/loss": (self.accelerator.reduce(loss_sum, reduction="mean") / n_steps).item(),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/images_per_s": n_steps * self.tc.batch_size / max(seconds, 1e-9),
        }
        metrics.update({f"train/{k}": v for k, v in logs.items()})
        if self.data_metrics is not None:  # draws of this epoch so far, over all processes
            done = (step - (step - 1) // self.steps_per_epoch * self.steps_per_epoch) * self.tc.batch_size
            metrics.update(self.data_metrics(upto=done, step=step - 1))
        self.record.log(metrics, step, step / self.steps_per_epoch)
        if getattr(self.core, "last_tau", None) is not None:  # per-sample τ of the last batch
            self.record.log_histogram("train/tau_hist", self.core.last_tau, step)
        bar.set_postfix({k.split("/")[-1]: f"{float(v):.4g}" for k, v in metrics.items() if k in self.postfix_keys})
        self.check_temperatures(step)

    def check_temperatures(self, step: int) -> None:
        """Warn once per τ module that reports itself stuck (:meth:`Temperature.health`), on the main process."""
        for i, t in enumerate(self.temperatures):
            msg = None if i in self.health_warned else t.health()
            if msg is not None:
                self.health_warned.add(i)
                if self.accelerator.is_main_process:
                    warnings.warn(f"step {step}: {msg}", RuntimeWarning, stacklevel=2)
