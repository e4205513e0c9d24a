"""Pretraining loop on Accelerate: SimCLR or MoCo, every τ mode, 1 CPU to N GPUs / nodes.

Launch::

    accelerate launch -m simclr_tau.pretrain configs/fmnist_simclr_cpu.yaml train.epochs=5
    torchrun --nproc_per_node 2 -m simclr_tau.pretrain configs/... # a real multi-process CPU group
    simclr-tau pretrain configs/... [a.b=value ...] [--resume auto|RUN_DIR|CHECKPOINT]

``train.batch_size`` is the global batch (all processes, all accumulation steps); each process sees
``batch_size / (processes x grad_accum)`` pairs per micro-step, and NT-Xent contrasts every anchor with
the whole global micro-batch (gathered with gradient), so W processes train exactly like one with the
same global batch. The per-step order of work:

    before_step(step) (τ schedule, MoCo momentum) -> lr(step) -> grad_accum x (forward, backward)
    -> clip -> optimizer.step -> after_step(step) (τ bound projection, EMA update) -> log / checkpoint
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch.utils.data import DataLoader

from simclr_tau.config import to_yaml
from simclr_tau.data.augment import simclr_view_transform
from simclr_tau.data.batch_augment import BatchAugment
from simclr_tau.data.datasets import build_pretrain_dataset, normalization
from simclr_tau.data.pipeline import EpochSampler, TwoViewDataset, mix_seed
from simclr_tau.errors import UserError
from simclr_tau.methods import build_method
from simclr_tau.models.export import save_encoder
from simclr_tau.tracking import RunRecord, run_tags
from simclr_tau.train.checkpoint import (
    atomic_save,
    checkpoint_path,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune,
)
from simclr_tau.train.optim import build_optimizer, lr_at, scaled_lr, set_lr


@dataclass
class RunResult:
    run_dir: Path
    step: int
    stopped_early: bool = False


def default_run_name(cfg: Any) -> str:
    t = run_tags(cfg)
    return f"{t['method']}-{t['tau_mode']}-{t['dataset']}-{t['backbone']}-{time.strftime('%Y%m%d-%H%M%S')}"


def _resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
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


class _StopFlag:
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit cleanly (preemption, Ctrl-C)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
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


def run(cfg: Any, resume: Optional[str] = None) -> RunResult:
    """Pretrain as ``cfg`` says; returns the run directory. See the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    tc = cfg.train
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=tc.mixed_precision)
    world, is_main = accelerator.num_processes, accelerator.is_main_process
    set_seed(tc.seed)  # identical initial weights on every process
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)

    # ---- data -------------------------------------------------------------------------------
    dataset = build_pretrain_dataset(cfg.data)
    micro = tc.batch_size // tc.grad_accum  # global micro-batch
    if tc.batch_size > len(dataset):
        raise UserError(f"train.batch_size={tc.batch_size} is larger than the dataset ({len(dataset)} images)")
    if micro % world:
        raise UserError(f"train.batch_size / train.grad_accum = {micro} must be divisible by the {world} processes")
    if micro // world < 2:
        raise UserError(f"{world} processes leave {micro // world} sample(s) each per micro-batch of {micro} (need 2): "
                        f"raise train.batch_size to at least {2 * world * tc.grad_accum} (the dataset has "
                        f"{len(dataset)} images) or launch fewer processes")
    steps_per_epoch = len(dataset) // tc.batch_size
    total_steps = tc.epochs * steps_per_epoch
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    image_size = cfg.data.image_size or dataset.image_size
    norm = normalization(cfg.data.name, dataset)
    sampler = EpochSampler(len(dataset), tc.seed)
    pipeline = cfg.data.pipeline
    if pipeline == "auto":
        pipeline = "batched" if dataset.images is not None else "dataloader"
    if pipeline == "batched":
        if dataset.images is None:
            raise UserError("data.pipeline=batched needs an in-memory dataset; use data.pipeline=dataloader for imagefolder")
        augment = BatchAugment(cfg.augment, image_size, dataset.channels, norm.mean, norm.std)
        loader: Any = _BatchedLoader(dataset.images, augment, sampler, micro, world, accelerator.process_index,
                                     tc.seed, accelerator.device)
    else:
        view = simclr_view_transform(cfg.augment, image_size, dataset.channels, norm.mean, norm.std)
        loader = _ShardedLoader(TwoViewDataset(dataset, view, tc.seed), sampler, micro, world,
                                accelerator.process_index, cfg.data.num_workers)

    # ---- model, optimizer --------------------------------------------------------------------
    method = build_method(cfg, dataset.channels, steps_per_epoch, total_steps)
    if cfg.model.sync_bn and world > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    peak_lr = scaled_lr(cfg.optim, tc.batch_size)
    optimizer = build_optimizer(cfg.optim, method, cfg.temperature.lr_scale, peak_lr)
    method, optimizer = accelerator.prepare(method, optimizer)
    core = accelerator.unwrap_model(method)
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))

    # ---- run directory, resume ---------------------------------------------------------------
    run_name = tc.run_name or default_run_name(cfg)
    run_dir = Path(tc.output_dir) / run_name
    ckpt_dir = run_dir / "checkpoints"
    start_step, wandb_id = 0, None
    ckpt = _resolve_resume(resume, run_dir)
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        _load_training_state(core, optimizer, state, ckpt)
        start_step, wandb_id = int(state["step"]), state.get("wandb_id")
        if is_main:
            print(f"resumed from {ckpt} at step {start_step}", flush=True)
    elif resume == "auto" and (run_dir / "metrics.jsonl").exists():
        # killed before its first checkpoint: nothing to keep, redo it from step 0
        if is_main:
            print(f"no valid checkpoint in {ckpt_dir}: restarting {run_name} from step 0", flush=True)
    elif (run_dir / "metrics.jsonl").exists():
        raise UserError(f"run directory {run_dir} already holds a run; resume it with --resume auto "
                        "or choose another train.run_name")
    # every process has looked at the run directory before the main one writes to it (else a slower
    # process would find the new metrics.jsonl and take this fresh run for an old one)
    accelerator.wait_for_everyone()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if resume is not None:
            _truncate_metrics(run_dir / "metrics.jsonl", start_step)
    record = RunRecord(run_dir, cfg, run_name, is_main, wandb_id)

    def first_bad_step() -> int:
        """The first step (1-based, as in metrics.jsonl) whose loss was non-finite on any process, or -1."""
        bad = accelerator.gather(first_bad.reshape(1)) if world > 1 else first_bad.reshape(1)
        bad = bad[bad >= 0]
        return int(bad.min().item()) + 1 if bad.numel() else -1  # a host sync: only at log / save time

    def save(step: int) -> None:
        # never checkpoint a diverged model: the last checkpoint on disk stays the last good one
        bad = first_bad_step()
        if bad > 0:
            _stop_nonfinite(record, bad, ckpt_dir)
        finite = [torch.isfinite(t).all() for t in core.state_dict().values()
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]  # (not a τ schedule's extra state)
        if not bool(torch.stack(finite).all()):
            _stop_nonfinite(record, step, ckpt_dir, what="non-finite weights after")
        if is_main:
            atomic_save(
                {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "epoch": step / steps_per_epoch, "run_name": run_name, "wandb_id": record.wandb_id or ""},
                checkpoint_path(ckpt_dir, step),
            )
            prune(ckpt_dir, tc.keep_last)
        accelerator.wait_for_everyone()

    eval_data: Dict[str, Any] = {}

    def online_eval(step: int) -> Dict[str, float]:
        """kNN top-1 of the current encoder on the test split (memory bank: a train subset)."""
        from simclr_tau.data.augment import eval_transform
        from simclr_tau.data.datasets import build_eval_datasets
        from simclr_tau.evaluation.knn import online_knn

        if not eval_data:
            eval_data["train"], eval_data["test"] = build_eval_datasets(cfg.data)
            eval_data["tf"] = eval_transform(image_size, dataset.channels, norm.mean, norm.std)
        return online_knn(core.encoder, eval_data["train"], eval_data["test"], eval_data["tf"], list(cfg.eval.knn_k),
                          list(cfg.eval.knn_t), cfg.eval.online_knn_subset, accelerator, cfg.eval.batch_size, tc.seed)

    # ---- loop ---------------------------------------------------------------------------------
    device = accelerator.device
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    step, stopped_early = start_step, False
    bar = tqdm(total=total_steps, initial=start_step, disable=not (is_main and tc.progress), unit="step",
               dynamic_ncols=True, desc=run_name[:40])
    t_log, last_log_step = time.perf_counter(), step
    method.train()
    with _StopFlag() as stop:
        while step < total_steps:
            epoch = step // steps_per_epoch
            batches = loader.epoch(epoch, skip_steps=step - epoch * steps_per_epoch, accum=tc.grad_accum)
            for micro_batches in batches:
                core.before_step(step)
                set_lr(optimizer, lr_at(step, total_steps, warmup_steps, peak_lr, cfg.optim.final_lr_ratio))
                for i, (x1, x2) in enumerate(micro_batches):
                    x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
                    sync = i == len(micro_batches) - 1
                    ctx = accelerator.no_sync(method) if not sync else _nullcontext()
                    with ctx, accelerator.autocast():
                        loss, logs = method(x1, x2)
                        accelerator.backward(loss / len(micro_batches))
                    loss_sum += loss.detach() / len(micro_batches)
                    first_bad = torch.where(
                        (first_bad < 0) & ~torch.isfinite(loss.detach()), torch.full_like(first_bad, step), first_bad)
                if cfg.optim.grad_clip is not None:
                    accelerator.clip_grad_norm_(method.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                core.after_step(step)
                step += 1
                bar.update(1)
                end_of_epoch = step % steps_per_epoch == 0
                sync_point = step % tc.log_every == 0 or end_of_epoch or step == total_steps
                # A signal may reach the processes at different steps: they agree on stopping at a common
                # log step (one small collective there), so that all of them save at the same step.
                stopping = stop.requested if world == 1 else sync_point and _any_process(accelerator, stop.requested)
                if sync_point or stopping:
                    bad = first_bad_step()  # the one host sync of a logging step
                    if bad > 0:
                        _stop_nonfinite(record, bad, ckpt_dir)
                    now = time.perf_counter()
                    n_steps = step - last_log_step
                    metrics = {
                        # mean over processes = the loss of the global batch
                        "train/loss": (accelerator.reduce(loss_sum, reduction="mean") / n_steps).item(),
                        "train/lr": optimizer.param_groups[0]["lr"],
                        "train/images_per_s": n_steps * tc.batch_size / max(now - t_log, 1e-9),
                    }
                    metrics.update({f"train/{k}": v for k, v in logs.items()})
                    record.log(metrics, step, step / steps_per_epoch)
                    if getattr(core, "last_tau", None) is not None:  # per-sample τ of the last batch
                        record.log_histogram("train/tau_hist", core.last_tau, step)
                    bar.set_postfix({k.split("/")[-1]: f"{float(v):.4g}" for k, v in metrics.items()
                                     if k in ("train/loss", "train/tau", "train/tau_mean", "train/images_per_s")})
                    loss_sum.zero_()
                    t_log, last_log_step = now, step
                if end_of_epoch and cfg.eval.online_knn_every and (step // steps_per_epoch) % cfg.eval.online_knn_every == 0:
                    knn = online_eval(step)
                    # online_knn/...: a train subset as memory bank, distinct from the final `simclr-tau knn`
                    record.log({f"online_{k}": v for k, v in knn.items()}, step, step / steps_per_epoch)
                    # a plateau τ schedule monitors the first (k, T) pair's top-1
                    core.temperature.observe(next(iter(knn.values())))
                if ((end_of_epoch and (step // steps_per_epoch) % tc.save_every_epochs == 0) or step == total_steps
                        or (tc.save_every_steps and step % tc.save_every_steps == 0) or stopping):
                    save(step)
                if stopping:
                    stopped_early = True
                    if is_main:
                        print(f"stopped by signal at step {step}; checkpoint saved in {ckpt_dir}. "
                              f"Resume with --resume auto (train.run_name={run_name})", flush=True)
                    break
                if step >= total_steps:
                    break
            if stopped_early:
                break
    bar.close()

    if is_main and not stopped_early:
        save_encoder(run_dir / "encoder.safetensors", core.encoder, cfg.model, dataset.channels, image_size,
                     norm.mean, norm.std)
        record.update_summary({"step": step, "epochs": step / steps_per_epoch, "images": step * tc.batch_size,
                               "final/train_loss": _last_metric(run_dir, "train/loss")})
    record.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(run_dir, step, stopped_early)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


class _ShardedLoader:
    """Yields optimizer steps as lists of ``accum`` micro-batches ``(x1, x2)`` for this process.

    Rank r takes the r-th slice of every global micro-batch cut from the epoch's permutation, so the
    global batch is the same for any number of processes (we shard by hand rather than with
    ``accelerator.prepare(loader)`` to guarantee that, and to resume mid-epoch by construction).
    """

    def __init__(self, dataset: TwoViewDataset, sampler: EpochSampler, micro: int, world: int, rank: int,
                 num_workers: int) -> None:
        self.dataset, self.sampler, self.micro, self.world, self.rank = dataset, sampler, micro, world, rank
        self.num_workers = num_workers

    def epoch(self, epoch: int, skip_steps: int, accum: int):
        self.sampler.set_epoch(epoch)
        keys = list(iter(self.sampler))
        n_steps = len(keys) // self.micro // accum
        per = self.micro // self.world
        mine = []  # the r-th slice of each global micro-batch, from the first unfinished step on
        for b in range(skip_steps * accum, n_steps * accum):
            start = b * self.micro + self.rank * per
            mine.extend(keys[start:start + per])
        loader = DataLoader(self.dataset, batch_size=per, sampler=mine, drop_last=True,
                            num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        group = []
        for x1, x2, _ in loader:
            group.append((x1, x2))
            if len(group) == accum:
                yield group
                group = []


def _last_metric(run_dir: Path, key: str) -> Optional[float]:
    import json

    path = run_dir / "metrics.jsonl"
    value = None
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if key in row:
                value = row[key]
    return value


class _BatchedLoader:
    """The fast path for in-memory datasets: the uint8 images live on the training device and both views
    are augmented there in one vectorized call per view (no per-image Python work).

    Augmentation parameters are drawn for the whole *global* micro-batch from a generator seeded by
    ``(seed, epoch, micro-batch, view)`` and each rank keeps its slice, so the views (like the batches)
    do not depend on the number of processes, and a resumed run redraws exactly the same ones.
    """

    def __init__(self, images: torch.Tensor, augment: BatchAugment, sampler: EpochSampler, micro: int, world: int,
                 rank: int, seed: int, device: torch.device) -> None:
        self.images = images.to(device)
        self.augment = augment.to(device)
        self.sampler, self.micro, self.world, self.rank, self.seed, self.device = sampler, micro, world, rank, seed, device

    def epoch(self, epoch: int, skip_steps: int, accum: int):
        self.sampler.set_epoch(epoch)
        order = torch.tensor([i for _, i in self.sampler], dtype=torch.long)
        n_steps = len(order) // self.micro // accum
        per = self.micro // self.world
        lo, hi = self.rank * per, (self.rank + 1) * per
        gen = torch.Generator(device=self.device)
        for s in range(skip_steps, n_steps):
            group = []
            for b in range(s * accum, (s + 1) * accum):
                x = self.images[order[b * self.micro + lo: b * self.micro + hi].to(self.device)]
                views = []
                for v in (0, 1):
                    gen.manual_seed(mix_seed(self.seed, epoch, 2 * b + v))
                    params = self.augment.sample_params(self.micro, gen, self.device, input_size=x.shape[-2:])
                    views.append(self.augment.apply(x, {k: t[lo:hi] for k, t in params.items()}))
                group.append((views[0], views[1]))
            yield group


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after ``step`` (they belong to the interrupted attempt being redone), and a
    last line torn by a kill mid-write."""
    import json

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


def _any_process(accelerator: Any, flag: bool) -> bool:
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _load_training_state(core: torch.nn.Module, optimizer: Any, state: Any, ckpt: Path) -> None:
    """Load a checkpoint's model and optimizer state; a checkpoint of another model is a UserError
    listing the mismatched keys (strict loading would raise a RuntimeError traceback)."""
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "optimizer" not in state \
            or "step" not in state:
        raise UserError(f"--resume {ckpt}: not a pretraining checkpoint (needs 'model', 'optimizer' and 'step'); "
                        "pass a run directory or a checkpoints/step_*.pt file")
    own, theirs = core.state_dict(), state["model"]
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
    core.load_state_dict(theirs)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:  # torch: "loaded state dict contains a parameter group that doesn't match"
        raise UserError(f"--resume {ckpt}: its optimizer state does not match this config's optimizer "
                        f"({str(e).splitlines()[0][:150]}): resume with the config the checkpoint was trained "
                        "with") from None


def _stop_nonfinite(record: RunRecord, step: int, ckpt_dir: Path, what: str = "non-finite loss at") -> None:
    """Stop a diverged run; ``step`` is numbered as in metrics.jsonl (optimizer steps done)."""
    record.update_summary({"error": f"{what} step {step}"})
    record.close()
    kept = list_checkpoints(ckpt_dir)
    kept_msg = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was saved before it"
    raise UserError(
        f"{what} step {step}; {kept_msg}. "
        "Lower optim.lr, raise temperature.tau_min, or set optim.grad_clip, then --resume auto"
    )
