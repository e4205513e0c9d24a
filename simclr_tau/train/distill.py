"""Distillation of a frozen teacher into a student encoder: ``run(cfg)`` (the command line is
:mod:`simclr_tau.distill`: ``simclr-tau distill CONFIG``, ``accelerate launch -m simclr_tau.distill CONFIG``).

``train.method`` picks the objective (see :mod:`simclr_tau.methods.distill`):

- ``seed``: SEED relational distillation over a queue of teacher embeddings, τ_s = ``temperature``,
  τ_t = ``teacher_temperature`` (each fixed, learnable, scheduled or conditional);
- ``kd``: α·CE + (1 − α)·T²·KL against the teacher's encoder + linear probe, T = ``temperature``
  (fixed, learnable, scheduled = annealed); ``distill.ctkd=true``: CTKD, a learnable T behind a
  gradient-reversal layer whose λ ramps by a cosine from ``grl_lambda_min`` to ``grl_lambda_max``.

The teacher and its probe: :mod:`simclr_tau.train.teacher`.

The loop is the pretraining loop's (same loaders, optimizer groups, lr schedule, checkpoints, run
record, stop-on-signal, non-finite guard). Each image contributes its two augmented views as two samples;
teacher and student see the same view. Run directory: ``config.yaml`` (the student's data/model view,
what ``simclr-tau knn RUN_DIR`` reads), ``distill.yaml`` (the full config), ``metrics.jsonl``
(``train/tau_s``, ``train/tau_t`` or ``train/T``, ...), ``summary.json``, ``checkpoints/`` (without the
teacher's weights), ``encoder.safetensors`` (the student backbone).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from simclr_tau.config import resolve_defaults, to_yaml
from simclr_tau.data.datasets import build_pretrain_dataset, normalization
from simclr_tau.data.pipeline import EpochSampler
from simclr_tau.errors import UserError
from simclr_tau.methods.distill import build_distill_method
from simclr_tau.models.export import save_encoder
from simclr_tau.records.writer import RunRecord, run_tags
from simclr_tau.train.loaders import build_loader, global_micro_batch
from simclr_tau.train.loop import Trainer
from simclr_tau.train.session import (RunResult, last_metric, online_knn_fn, open_run, prepare_method, restore,
                                      start_accelerator, write_run_files)
from simclr_tau.train.teacher import build_teacher


def eval_view_yaml(cfg: Any) -> str:
    """The run's ``config.yaml``: the sections the evaluation commands read (``load_config`` with the
    pretraining schema accepts it), without the distillation-only keys."""
    c = OmegaConf.to_container(cfg, resolve=True)
    view = {k: c[k] for k in ("data", "augment", "model", "optim", "eval", "wandb")}
    view["train"] = {k: v for k, v in c["train"].items() if k != "method"}
    return "# The student's data/model view of a distillation run; the full config is distill.yaml.\n" + OmegaConf.to_yaml(view)


def _with_labels(batches: Any, labels: torch.Tensor, sampler: Any, epoch: int, skip_steps: int, accum: int,
                 micro: int, world: int, rank: int):
    """Pair the loaders' two-view micro-batches with their labels, as ``(cat(x1, x2), cat(y, y))``.

    The loaders cut rank r's slice ``[b·micro + r·per, b·micro + (r+1)·per)`` of the epoch's order for
    micro-batch b; the same slice of the same (deterministic) order gives the labels.
    """
    sampler.set_epoch(epoch)
    order = torch.tensor([i for _, i in sampler], dtype=torch.long)
    per, b = micro // world, skip_steps * accum
    for group in batches:
        out = []
        for x1, x2, _ in group:
            y = labels[order[b * micro + rank * per: b * micro + (rank + 1) * per]]
            out.append((torch.cat([x1, x2]), torch.cat([y, y])))
            b += 1
        yield out


def run(cfg: Any, resume: Optional[str] = None) -> Any:
    """Distill as ``cfg`` (a validated DistillConfig) says; returns a RunResult (run_dir, step)."""
    tc = cfg.train
    accelerator = start_accelerator(tc)
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process

    # ---- data (as pretraining, plus labels) ------------------------------------------------------
    dataset = build_pretrain_dataset(cfg.data)
    micro = global_micro_batch(tc, len(dataset), world)
    if cfg.train.method == "kd" and (dataset.labels < 0).any():
        raise UserError(f"train.method=kd needs labels; data.name={cfg.data.name} has unlabelled images (STL-10 unlabeled)")
    steps_per_epoch = len(dataset) // tc.batch_size
    total_steps = min(tc.epochs * steps_per_epoch, tc.max_steps or tc.epochs * steps_per_epoch)
    image_size = cfg.data.image_size or dataset.image_size
    norm = normalization(cfg.data.name, dataset)
    loader = build_loader(cfg, dataset, image_size, norm.mean, norm.std, EpochSampler(len(dataset), tc.seed), micro,
                          world, rank, accelerator.device)
    label_sampler = EpochSampler(len(dataset), tc.seed)  # a twin: the loader iterates its own

    # ---- run directory, teacher, student -------------------------------------------------------
    run_name = tc.run_name or (f"distill-{tc.method}-{run_tags(cfg)['tau_mode']}-{cfg.data.name}-{cfg.model.backbone}-"
                               f"{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = Path(tc.output_dir) / run_name
    ckpt, lock = open_run(run_dir, run_name, resume, accelerator)
    with lock:  # one writer per run directory, released however the run ends
        teacher, teacher_metrics = build_teacher(cfg, dataset, image_size, norm, accelerator, run_dir, ckpt is not None)
        method = build_distill_method(cfg, teacher, dataset.channels, steps_per_epoch, total_steps)
        method, optimizer, core = prepare_method(method, cfg, accelerator)

        # the teacher is not in the checkpoint: it stays on disk
        start_step, wandb_id, log_window = restore(core, optimizer, ckpt, accelerator, not_saved=("teacher.",))
        resolved = resolve_defaults(cfg, image_size)  # the saved configs hold the values used, not `null`
        if is_main:
            write_run_files(run_dir, {"distill.yaml": to_yaml(resolved), "config.yaml": eval_view_yaml(resolved)}, resume,
                            start_step, image_size)
        record = RunRecord(run_dir, resolved, run_name, is_main, wandb_id)

        trainer = Trainer(cfg, accelerator, method, optimizer, record, run_dir, run_name, steps_per_epoch, total_steps,
                          online_eval=online_knn_fn(cfg, accelerator, core.encoder, image_size, dataset.channels,
                                                    norm.mean, norm.std),
                          not_saved=("teacher.",),
                          postfix_keys=("train/loss", "train/tau_s", "train/tau_t", "train/T", "train/images_per_s"))

        def batches(epoch: int, skip: int):
            return _with_labels(loader.epoch(epoch, skip, tc.grad_accum), dataset.labels, label_sampler, epoch, skip,
                                tc.grad_accum, micro, world, rank)

        step, stopped_early = trainer.fit(start_step, batches, log_window)

        if is_main and not stopped_early:
            save_encoder(run_dir / "encoder.safetensors", core.encoder, cfg.model, dataset.channels, image_size,
                         norm.mean, norm.std)
            record.update_summary({"step": step, "epochs": step / steps_per_epoch, "images": step * tc.batch_size,
                                   "final/train_loss": last_metric(run_dir, "train/loss"), **teacher_metrics})
        record.close()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return RunResult(run_dir, step, stopped_early, total_steps, is_main)
