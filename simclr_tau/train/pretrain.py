"""Pretraining on Accelerate: SimCLR or MoCo, every τ mode, 1 CPU to N GPUs / nodes.

Launch::

    accelerate launch -m simclr_tau.pretrain configs/fmnist_simclr_cpu.yaml train.epochs=5
    torchrun --nproc_per_node 2 -m simclr_tau.pretrain configs/... # a real multi-process CPU group
    simclr-tau pretrain configs/... [a.b=value ...] [--resume auto|RUN_DIR|CHECKPOINT]

``train.batch_size`` is the global batch (all processes, all accumulation steps); each process sees
``batch_size / (processes x grad_accum)`` pairs per micro-step, and NT-Xent contrasts every anchor with
the whole global micro-batch (gathered with gradient), so W processes train exactly like one with the
same global batch. The step itself lives in :mod:`simclr_tau.train.loop`, the run directory, resume and
the Accelerator in :mod:`simclr_tau.train.session` (shared with :mod:`simclr_tau.train.distill`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional


from simclr_tau.config import resolve_defaults, to_yaml
from simclr_tau.data.datasets import build_pretrain_dataset, normalization
from simclr_tau.data.pipeline import EpochSampler
from simclr_tau.methods import build_method
from simclr_tau.models.export import save_encoder
from simclr_tau.records.writer import RunRecord, run_tags
from simclr_tau.train.loaders import build_loader, global_micro_batch
from simclr_tau.train.loop import Trainer
from simclr_tau.train.session import (RunResult, last_metric, online_knn_fn, open_run, prepare_method, restore,
                                      start_accelerator, write_run_files)


def default_run_name(cfg: Any) -> str:
    t = run_tags(cfg)
    return f"{t['method']}-{t['tau_mode']}-{t['dataset']}-{t['backbone']}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(cfg: Any, resume: Optional[str] = None) -> RunResult:
    """Pretrain as ``cfg`` says; returns the run directory. See the module docstring."""
    tc = cfg.train
    accelerator = start_accelerator(tc)
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process

    # ---- data -------------------------------------------------------------------------------
    if cfg.data.name == "mixture":  # several sources, drawn with a temperature (simclr_tau.data.mixture)
        from simclr_tau.data.mixture import build_mixture

        dataset, sampler = build_mixture(cfg.data, cfg.data.sources, cfg.data.mixture, seed=tc.seed,
                                         batch_size=tc.batch_size, epochs=tc.epochs, max_steps=tc.max_steps)
    else:
        dataset = build_pretrain_dataset(cfg.data)
        sampler = EpochSampler(len(dataset), tc.seed)
    micro = global_micro_batch(tc, len(sampler), world)
    steps_per_epoch = len(sampler) // tc.batch_size  # draws per epoch (a mixture's need not be len(dataset))
    total_steps = min(tc.epochs * steps_per_epoch, tc.max_steps or tc.epochs * steps_per_epoch)
    image_size = cfg.data.image_size or dataset.image_size
    norm = normalization(cfg.data.name, dataset)
    loader = build_loader(cfg, dataset, image_size, norm.mean, norm.std, sampler, micro, world, rank,
                          accelerator.device)

    # ---- model, optimizer --------------------------------------------------------------------
    method = build_method(cfg, dataset.channels, steps_per_epoch, total_steps, num_samples=len(dataset))
    method, optimizer, core = prepare_method(method, cfg, accelerator)

    # ---- run directory, resume ---------------------------------------------------------------
    run_name = tc.run_name or default_run_name(cfg)
    run_dir = Path(tc.output_dir) / run_name
    ckpt, lock = open_run(run_dir, run_name, resume, accelerator)
    with lock:  # one writer per run directory, released however the run ends
        start_step, wandb_id, log_window = restore(core, optimizer, ckpt, accelerator)
        resolved = resolve_defaults(cfg, image_size)  # config.yaml holds the values used, not `null`
        if is_main:
            write_run_files(run_dir, {"config.yaml": to_yaml(resolved)}, resume, start_step, image_size)
        record = RunRecord(run_dir, resolved, run_name, is_main, wandb_id)

        # ---- train -----------------------------------------------------------------------------------
        trainer = Trainer(cfg, accelerator, method, optimizer, record, run_dir, run_name, steps_per_epoch, total_steps,
                          online_eval=online_knn_fn(cfg, accelerator, core.encoder, image_size, dataset.channels,
                                                    norm.mean, norm.std) if cfg.data.name != "mixture" else None,
                          data_metrics=getattr(sampler, "log_metrics", None))
        step, stopped_early = trainer.fit(start_step, lambda epoch, skip: loader.epoch(epoch, skip, tc.grad_accum),
                                           log_window)

        if is_main and not stopped_early:
            save_encoder(run_dir / "encoder.safetensors", core.encoder, cfg.model, dataset.channels, image_size,
                         norm.mean, norm.std)
            record.update_summary({"step": step, "epochs": step / steps_per_epoch, "images": step * tc.batch_size,
                                   "final/train_loss": last_metric(run_dir, "train/loss")})
        record.close()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return RunResult(run_dir, step, stopped_early, total_steps, is_main)
