"""The training loop shared by pretraining (:mod:`simclr_tau.train.pretrain`) and distillation
(:mod:`simclr_tau.train.distill`): the optimizer step, logging, online kNN, checkpoints, signals and the
non-finite guard (the run directory and resume are :mod:`simclr_tau.train.session`). Each caller builds its data, method and optimizer and
hands them to a :class:`Trainer`.

Per optimizer step:

    before_step(step) (τ schedule, MoCo momentum) -> lr(step) -> grad_accum x (forward, backward)
    -> clip -> optimizer.step -> after_step(step) (τ bound projection, EMA update) -> log / checkpoint

The loss and τ stay on the device between log steps (no host sync inside a step): a non-finite loss is
recorded on the device and checked at the next log or save, and a diverged model is never checkpointed: a save
first checks that the state is good (finite, every model tensor within
:data:`~simclr_tau.train.checkpoint.MAX_ABS`: a finite loss can hide BatchNorm running variances of 1e33) and
otherwise stops the run naming the last good checkpoint and what to change.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from simclr_tau.errors import UserError
from simclr_tau.records.writer import RunRecord
from simclr_tau.temperature import Temperature
from simclr_tau.train.checkpoint import (
    MAX_ABS,
    atomic_save,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    prune,
    state_problem,
)
from simclr_tau.train.optim import lr_at, scaled_lr, set_lr
from simclr_tau.train.progress import Progress
from simclr_tau.train.signals import StopFlag


def divergence_fix(cfg: Any) -> str:
    """What to change after a divergence, with the run's current values."""
    clip = cfg.optim.grad_clip
    clip_hint = "set optim.grad_clip (e.g. 1.0)" if clip is None else f"lower optim.grad_clip (now {clip:g})"
    return f"Lower optim.lr (now {cfg.optim.lr:g}), {clip_hint}, or raise temperature.tau_min"


def stop_nonfinite(record: RunRecord, step: int, ckpt_dir: Path, what: str = "non-finite loss at",
                   detail: Optional[str] = None, fix: str = "Lower optim.lr, raise temperature.tau_min, or set "
                   "optim.grad_clip") -> None:
    """Stop a diverged run; ``step`` is numbered as in metrics.jsonl (optimizer steps done). The message names
    the newest good checkpoint on disk (the one ``--resume auto`` takes) and ``fix``."""
    record.update_summary({"error": f"{what} step {step}"})
    record.close()
    with warnings.catch_warnings():  # the stop message says it all
        warnings.simplefilter("ignore")
        good = latest_valid_checkpoint(ckpt_dir)
    resume = "--resume auto"
    if good is not None:
        kept_msg = f"the last good checkpoint {good} is kept"
    elif list_checkpoints(ckpt_dir):  # --resume auto skips diverged checkpoints: it starts again
        kept_msg, resume = f"no good checkpoint is left in {ckpt_dir}", "--resume auto (it restarts from step 0)"
    else:
        kept_msg = "no checkpoint was saved before it"
    raise UserError(f"{what} step {step}{f' ({detail})' if detail else ''}; {kept_msg}. {fix}, then {resume}")


def any_process(accelerator: Any, flag: bool) -> bool:
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def to_device(batch: Any, device: torch.device, channels_last: bool) -> List[torch.Tensor]:
    """Move a micro-batch to ``device``; 4-d image tensors in channels-last layout when asked."""
    out = []
    for t in batch:
        t = t.to(device, non_blocking=True)
        out.append(t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t)
    return out


class LossWindow:
    """The losses of the steps since the last log row (``from_step`` .. now), summed on the device; the next row
    logs their mean. A checkpoint between log rows carries the window (:meth:`state`), so that the first row
    after a resume averages the same steps as an uninterrupted run's row, bit for bit with one process (with
    several, the saved sum is already their mean: the same up to rounding). A checkpoint without one (written
    before it existed) restarts the window at its step: that row averages only the steps run since."""

    def __init__(self, from_step: int, device: torch.device, saved: Optional[Dict[str, Any]] = None) -> None:
        self.from_step, self.sum = from_step, torch.zeros((), device=device)
        if saved is not None and isinstance(saved.get("loss_sum"), torch.Tensor) and \
                0 <= int(saved.get("from_step", -1)) <= from_step:
            self.from_step = int(saved["from_step"])
            self.sum += saved["loss_sum"].to(device)

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss.detach()

    def mean(self, step: int, accelerator: Any) -> float:
        """The window's mean loss, averaged over processes (= the loss of the global batch); a host sync."""
        return (accelerator.reduce(self.sum, reduction="mean") / (step - self.from_step)).item()

    def restart(self, step: int) -> None:
        self.from_step = step
        self.sum.zero_()

    def state(self, accelerator: Any) -> Dict[str, Any]:
        """What a checkpoint keeps of the window (every process calls it: a collective with several)."""
        return {"from_step": self.from_step, "loss_sum": accelerator.reduce(self.sum, reduction="mean").cpu()}


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
        self.window = LossWindow(0, accelerator.device)

    # ---- non-finite guard and checkpoints -----------------------------------------------------
    def first_bad_step(self) -> int:
        """The first step (1-based, as in metrics.jsonl) whose loss was non-finite on any process, or -1."""
        bad = self.first_bad.reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.gather(bad)
        bad = bad[bad >= 0]
        return int(bad.min().item()) + 1 if bad.numel() else -1  # a host sync: only at log / save time

    def state_problem(self, state: Dict[str, Any]) -> Optional[str]:
        """Why this state may not be checkpointed (see :func:`~simclr_tau.train.checkpoint.state_problem`), or
        None; the processes agree (BatchNorm statistics differ between them without SyncBN)."""
        problem = state_problem(state, MAX_ABS) or state_problem(self.optimizer.state_dict(), float("inf"), "optimizer")
        if self.accelerator.num_processes > 1 and any_process(self.accelerator, problem is not None):
            problem = problem or "on another process"
        return problem

    def save(self, step: int) -> None:
        # never checkpoint a diverged model: the last checkpoint on disk stays the last good one
        bad = self.first_bad_step()
        if bad > 0:
            stop_nonfinite(self.record, bad, self.ckpt_dir, fix=divergence_fix(self.cfg))
        state = {k: v for k, v in self.core.state_dict().items() if not k.startswith(self.not_saved)}
        problem = self.state_problem(state)
        if problem is not None:
            stop_nonfinite(self.record, step, self.ckpt_dir, what="diverged state after", detail=problem,
                           fix=divergence_fix(self.cfg))
        window = self.window.state(self.accelerator)
        if self.accelerator.is_main_process:
            path = checkpoint_path(self.ckpt_dir, step)
            atomic_save({"model": state, "optimizer": self.optimizer.state_dict(), "step": step,
                         "epoch": step / self.steps_per_epoch, "run_name": self.run_name,
                         "wandb_id": self.record.wandb_id or "", "log_window": window}, path)
            prune(self.ckpt_dir, self.tc.keep_last, keep=path)
        self.accelerator.wait_for_everyone()

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self, start_step: int, epoch_batches: Callable[[int, int], Iterable[List[Tuple[torch.Tensor, ...]]]],
            log_window: Optional[Dict[str, Any]] = None) -> Tuple[int, bool]:
        """Train from ``start_step`` to the end. ``epoch_batches(epoch, skip_steps)`` yields, per optimizer
        step, this process's micro-batches; ``log_window``: the resumed checkpoint's (:class:`LossWindow`).
        Returns (last step, stopped early by a signal)."""
        tc, acc, core, method, optimizer = self.tc, self.accelerator, self.core, self.method, self.optimizer
        spe, total = self.steps_per_epoch, self.total_steps
        self.window = LossWindow(start_step, acc.device, log_window)
        step, stopped_early = start_step, False
        bar = Progress(total, start_step, self.run_name[:40], acc.is_main_process and tc.progress, self.postfix_keys)
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
                        self.window.add(loss / len(micro_batches))
                        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss.detach()),
                                                     torch.full_like(self.first_bad, step), self.first_bad)
                    if self.cfg.optim.grad_clip is not None:
                        acc.clip_grad_norm_(method.parameters(), self.cfg.optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    core.after_step(step)
                    step += 1
                    bar.advance()
                    end_of_epoch = step % spe == 0
                    sync_point = step % tc.log_every == 0 or end_of_epoch or step == total
                    # A signal may reach the processes at different steps: they agree on stopping at a common
                    # log step (one small collective there), so that all of them save at the same step.
                    stopping = stop.requested if acc.num_processes == 1 else sync_point and any_process(acc, stop.requested)
                    if sync_point or stopping:
                        self._log(step, logs, time.perf_counter() - t_log, step - last_log_step, bar)
                        self.window.restart(step)
                        t_log, last_log_step = time.perf_counter(), step
                    if (end_of_epoch and self.online_eval is not None and self.cfg.eval.online_knn_every
                            and (step // spe) % self.cfg.eval.online_knn_every == 0):
                        t_eval = time.perf_counter()
                        bar.busy(step, "online kNN")
                        knn = self.online_eval()
                        # online_knn/...: a train subset as memory bank, distinct from the final `simclr-tau knn`
                        self.record.log({f"online_{k}": v for k, v in knn.items()}, step, step / spe)
                        core.observe(next(iter(knn.values())))  # a plateau schedule monitors the first top-1
                        seconds = time.perf_counter() - t_eval
                        bar.done("online kNN", knn, seconds)
                        t_log += seconds  # the next images/s window counts training steps, not the kNN
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

    def _log(self, step: int, logs: Dict[str, Any], seconds: float, n_steps: int, bar: Progress) -> None:
        """One metrics row; ``n_steps`` steps ran in the last ``seconds`` (the loss window may be longer)."""
        bad = self.first_bad_step()  # the one host sync of a logging step
        if bad > 0:
            stop_nonfinite(self.record, bad, self.ckpt_dir, fix=divergence_fix(self.cfg))
        metrics = {
            "train/loss": self.window.mean(step, self.accelerator),
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/images_per_s": n_steps * self.tc.batch_size / max(seconds, 1e-9),
        }
        metrics.update({f"train/{k}": v for k, v in logs.items()})
        for t in self.temperatures:  # state statistics (per-sample τ quantiles, ...), at log steps only
            metrics.update({f"train/{k}": v for k, v in t.log_stats().items()})
        if self.data_metrics is not None:  # draws of this epoch so far, over all processes
            done = (step - (step - 1) // self.steps_per_epoch * self.steps_per_epoch) * self.tc.batch_size
            metrics.update(self.data_metrics(upto=done, step=step - 1))
        self.record.log(metrics, step, step / self.steps_per_epoch)
        if getattr(self.core, "last_tau", None) is not None:  # per-sample τ of the last batch
            self.record.log_histogram("train/tau_hist", self.core.last_tau, step)
        bar.show(step, step / self.steps_per_epoch, metrics)
        self.check_temperatures(step)

    def check_temperatures(self, step: int) -> None:
        """Warn once per τ module that reports itself stuck (:meth:`Temperature.health`), on the main process."""
        for i, t in enumerate(self.temperatures):
            msg = None if i in self.health_warned else t.health()
            if msg is not None:
                self.health_warned.add(i)
                if self.accelerator.is_main_process:
                    warnings.warn(f"step {step}: {msg}", RuntimeWarning, stacklevel=2)
