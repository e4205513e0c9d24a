"""``simclr-tau distill CONFIG [a.b=value ...] [--resume auto|RUN_DIR|CKPT]``: distill a frozen teacher
into a student encoder (``accelerate launch -m simclr_tau.distill CONFIG`` for several processes).

``train.method`` picks the objective (see :mod:`simclr_tau.methods.distill`):

- ``seed``: SEED relational distillation over a queue of teacher embeddings, τ_s = ``temperature``,
  τ_t = ``teacher_temperature`` (each fixed, learnable, scheduled or conditional);
- ``kd``: α·CE + (1 − α)·T²·KL against the teacher's encoder + linear probe, T = ``temperature``
  (fixed, learnable, scheduled = annealed); ``distill.ctkd=true``: CTKD, a learnable T behind a
  gradient-reversal layer whose λ ramps by a cosine from ``grl_lambda_min`` to ``grl_lambda_max``.

The teacher (``teacher.path``) is a run directory (its ``encoder.safetensors``, else its newest valid
checkpoint), an ``encoder.safetensors``, or a pretraining checkpoint ``step_*.pt`` (architecture from
``teacher.model`` or the run's ``config.yaml``). The kd teacher's linear probe is ``teacher.probe`` or is
trained here (L-BFGS on the teacher's features of the labelled training set, hyperparameters chosen on a
held-out split, :func:`simclr_tau.evaluation.linear_probe.linear_probe`) and saved as
``<run>/teacher_probe.safetensors`` (reused on resume).

The loop is the pretraining loop's (same loaders, optimizer groups, lr schedule, checkpoints, run
record, stop-on-signal, non-finite guard). Each image contributes its two augmented views as two samples;
teacher and student see the same view. Run directory: ``config.yaml`` (the student's data/model view,
what ``simclr-tau knn RUN_DIR`` reads), ``distill.yaml`` (the full config), ``metrics.jsonl``
(``train/tau_s``, ``train/tau_t`` or ``train/T``, ...), ``summary.json``, ``checkpoints/`` (without the
teacher's weights), ``encoder.safetensors`` (the student backbone).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf

from simclr_tau.config import (AugmentConfig, Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TemperatureConfig,
                               TrainConfig, WandbConfig, load_config, to_yaml, validate, validate_temperature)
from simclr_tau.errors import UserError, exit_on_user_error


# ---- configuration ------------------------------------------------------------------------------

@dataclass
class TeacherConfig:
    path: str = ""  # run directory | encoder.safetensors | pretraining checkpoint (checkpoints/step_*.pt)
    model: Optional[Dict[str, Any]] = None  # architecture (ModelConfig fields) of a checkpoint; None: the run's config.yaml
    probe: Optional[str] = None  # kd: a saved teacher probe (teacher_probe.safetensors); None: train one here
    probe_iters: int = 100  # kd: L-BFGS iterations of the teacher's probe


@dataclass
class DistillObjectiveConfig:
    queue_size: int = 4096  # seed: teacher embeddings in the queue (SEED: 65536 on ImageNet)
    alpha: float = 0.5  # kd: weight of the label cross-entropy; 1 - alpha on T²·KL
    ctkd: bool = False  # kd: curriculum temperature (CTKD): learnable T behind a gradient-reversal layer
    grl_lambda_min: float = 0.0  # ctkd: λ at step 0
    grl_lambda_max: float = 1.0  # ctkd: λ at the end of the ramp
    grl_ramp_epochs: Optional[float] = None  # ctkd: cosine ramp length; None = the whole run (CTKD: 10 epochs)


@dataclass
class DistillConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillObjectiveConfig = field(default_factory=DistillObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # the student; seed: proj_* size its projection to the teacher's width
    temperature: TemperatureConfig = field(default_factory=lambda: TemperatureConfig(init=0.2))  # seed: τ_s | kd: T
    teacher_temperature: TemperatureConfig = field(default_factory=lambda: TemperatureConfig(init=0.01))  # seed: τ_t (SEED: 0.01)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(method="seed"))  # method: seed | kd
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


METHODS = ("seed", "kd")
_SHARED = ("data", "augment", "model", "temperature", "optim", "train", "eval", "wandb")


def validate_distill(cfg: Any) -> None:
    """Range checks of a DistillConfig (the shared sections with pretraining's own checks). UserError."""
    if cfg.train.method not in METHODS:
        raise UserError(f"train.method={cfg.train.method!r} is not valid for distillation; accepted: {', '.join(METHODS)}")
    view = OmegaConf.merge(OmegaConf.structured(Config), {k: cfg[k] for k in _SHARED})
    view.train.method = "simclr"  # pretraining's check of the method name does not apply here
    validate(view)
    validate_temperature(cfg.teacher_temperature, "teacher_temperature")
    if not cfg.teacher.path:
        raise UserError("teacher.path is empty: give a run directory, an encoder.safetensors or a checkpoint")
    d = cfg.distill
    if d.queue_size < 1:
        raise UserError(f"distill.queue_size={d.queue_size} must be >= 1")
    if not 0.0 <= d.alpha <= 1.0:
        raise UserError(f"distill.alpha={d.alpha} must lie in [0, 1]")
    if d.ctkd:
        t = cfg.temperature
        if cfg.train.method != "kd" or t.mode != "learnable" or t.tau_max is None:
            raise UserError("distill.ctkd=true needs train.method=kd and a bounded learnable T: temperature.mode=learnable "
                            "with temperature.tau_max set (CTKD: T in [1, 21]); T ascends the loss and is unbounded otherwise")
        if not 0.0 <= d.grl_lambda_min <= d.grl_lambda_max:
            raise UserError(f"distill.grl_lambda_min={d.grl_lambda_min} and grl_lambda_max={d.grl_lambda_max} "
                            "must satisfy 0 <= min <= max")
        if d.grl_ramp_epochs is not None and not d.grl_ramp_epochs > 0:
            raise UserError(f"distill.grl_ramp_epochs={d.grl_ramp_epochs} must be > 0")
    if cfg.teacher.probe_iters < 1:
        raise UserError(f"teacher.probe_iters={cfg.teacher.probe_iters} must be >= 1")


def load_distill_config(path: Optional[str], overrides: List[str] = ()) -> Any:  # type: ignore[assignment]
    cfg = load_config(path, list(overrides), schema=DistillConfig)
    validate_distill(cfg)
    return cfg


def eval_view_yaml(cfg: Any) -> str:
    """The run's ``config.yaml``: the sections the evaluation commands read (``load_config`` with the
    pretraining schema accepts it), without the distillation-only keys."""
    c = OmegaConf.to_container(cfg, resolve=True)
    view = {k: c[k] for k in ("data", "augment", "model", "optim", "eval", "wandb")}
    view["train"] = {k: v for k, v in c["train"].items() if k != "method"}
    return "# The student's data/model view of a distillation run; the full config is distill.yaml.\n" + OmegaConf.to_yaml(view)


# ---- teacher ------------------------------------------------------------------------------------

def load_teacher_encoder(tc: Any, in_chans: int) -> Tuple[torch.nn.Module, Dict[str, Any], str]:
    """(frozen encoder, metadata {image_size, mean, std} (None = the student's), description). UserError if unusable."""
    from safetensors.torch import load_file

    from simclr_tau.models.encoder import build_encoder, load_encoder_weights
    from simclr_tau.models.export import load_encoder
    from simclr_tau.train.checkpoint import latest_valid_checkpoint, load_checkpoint

    p = Path(tc.path)
    if not p.exists():
        raise UserError(f"teacher.path={p}: no such run directory, encoder file or checkpoint")
    run_dir: Optional[Path] = None
    if p.is_dir():
        run_dir = p
        if (p / "encoder.safetensors").is_file():
            p = p / "encoder.safetensors"
        else:
            ckpt = latest_valid_checkpoint(p / "checkpoints")
            if ckpt is None:
                raise UserError(f"teacher.path={p}: neither encoder.safetensors nor a valid checkpoint in {p / 'checkpoints'}")
            p = ckpt
    elif p.parent.name == "checkpoints":
        run_dir = p.parent.parent
    with torch.random.fork_rng(devices=[]):  # building the teacher must not shift the student's initialization
        if p.suffix == ".safetensors":
            encoder, meta = load_encoder(p)
            if tc.model is not None:  # an explicit architecture must match the file
                model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), tc.model)
                encoder, _ = build_encoder(model_cfg, meta["in_chans"])
                load_encoder_weights(encoder, load_file(str(p)), f"teacher.path={p}")
            meta = {k: meta[k] for k in ("in_chans", "image_size", "mean", "std")}
        else:
            state = load_checkpoint(p)
            weights = state.get("model") if isinstance(state, dict) else None
            enc_state = {k[len("encoder."):]: v for k, v in (weights or {}).items() if k.startswith("encoder.")}
            if not enc_state:
                raise UserError(f"teacher.path={p}: not a pretraining checkpoint (no encoder.* weights in 'model')")
            if tc.model is not None:
                model_src = tc.model
            elif run_dir is not None and (run_dir / "config.yaml").is_file():
                model_src = OmegaConf.load(run_dir / "config.yaml").get("model", {})
            else:
                raise UserError(f"teacher.path={p}: a checkpoint outside a run directory needs teacher.model (its architecture)")
            model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_src)
            encoder, _ = build_encoder(model_cfg, in_chans)
            load_encoder_weights(encoder, enc_state, f"teacher.path={p}")
            meta = {"in_chans": in_chans, "image_size": None, "mean": None, "std": None}
    if meta["in_chans"] != in_chans:
        fix = "rgb" if meta["in_chans"] == 3 else "native"
        raise UserError(f"teacher.path={p}: the teacher expects {meta['in_chans']}-channel images but the data give "
                        f"{in_chans}; set data.channels={fix}")
    return encoder.eval().requires_grad_(False), meta, str(p)


def teacher_probe(encoder: torch.nn.Module, meta: Dict[str, Any], train_ds: Any, cfg: Any, accelerator: Any,
                  run_dir: Path, resuming: bool = False) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """The kd teacher's linear probe {weight (F, C), bias, mean, std}: ``teacher.probe``, the run's saved one
    (``resuming``), or trained on the teacher's features of ``train_ds`` and saved (main process)."""
    from safetensors.torch import load_file, save_file

    from simclr_tau.data.augment import eval_transform
    from simclr_tau.data.datasets import build_eval_datasets
    from simclr_tau.evaluation.features import extract_features
    from simclr_tau.evaluation.linear_probe import ProbeConfig, linear_probe

    saved = run_dir / "teacher_probe.safetensors"
    source = Path(cfg.teacher.probe) if cfg.teacher.probe else (saved if resuming and saved.is_file() else None)
    num_classes = train_ds.num_classes
    if source is not None:
        if not source.is_file():
            raise UserError(f"teacher.probe={source}: file not found")
        probe = load_file(str(source))
        if set(probe) != {"weight", "bias", "mean", "std"} or probe["weight"].shape[1] != num_classes:
            raise UserError(f"teacher.probe={source}: not a probe for {num_classes} classes "
                            "(expected weight (F, C), bias, mean, std)")
        return probe, {}
    tf = eval_transform(meta["image_size"], train_ds.channels, meta["mean"], meta["std"])
    _, test_ds = build_eval_datasets(cfg.data)
    bs = cfg.eval.batch_size
    tr_f, tr_y = extract_features(encoder, train_ds, tf, bs, accelerator, desc="teacher features")
    te_f, te_y = extract_features(encoder, test_ds, tf, bs, accelerator, desc="teacher features")
    result = linear_probe(tr_f, tr_y, te_f, te_y, num_classes,
                          ProbeConfig(optimizer="lbfgs", epochs=cfg.teacher.probe_iters, seed=cfg.train.seed, retrain_full=True))
    head = result.full_head or result.head
    probe = {"weight": head.weight, "bias": head.bias, "mean": head.mean, "std": head.std}
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".tmp")
        save_file({k: v.contiguous().cpu() for k, v in probe.items()}, str(tmp))
        tmp.replace(saved)  # atomic: a resumed run never reads half a probe
    return probe, {"teacher/linear_test_top1": result.metrics["test_top1"]}


def build_teacher(cfg: Any, dataset: Any, image_size: int, norm: Any, accelerator: Any, run_dir: Path,
                  resuming: bool = False) -> Tuple[Any, Dict[str, float]]:
    """The :class:`~simclr_tau.methods.distill.FrozenTeacher` of ``cfg`` and teacher metrics for the summary."""
    from simclr_tau.methods.distill import FrozenTeacher

    encoder, meta, _ = load_teacher_encoder(cfg.teacher, dataset.channels)
    meta["image_size"] = meta["image_size"] or image_size
    meta["mean"], meta["std"] = meta["mean"] or list(norm.mean), meta["std"] or list(norm.std)
    if meta["image_size"] != image_size:
        raise UserError(f"teacher.path={cfg.teacher.path}: the teacher was trained on {meta['image_size']} px images, "
                        f"the student gets {image_size} px; set data.image_size={meta['image_size']}")
    # student-normalized x -> teacher-normalized: (x·σ_s + μ_s − μ_t) / σ_t
    scale = [s / t for s, t in zip(norm.std, meta["std"])]
    shift = [(ms - mt) / t for ms, mt, t in zip(norm.mean, meta["mean"], meta["std"])]
    probe, metrics = None, {}
    if cfg.train.method == "kd":
        encoder.to(accelerator.device)
        probe, metrics = teacher_probe(encoder, meta, dataset, cfg, accelerator, run_dir, resuming)
    return FrozenTeacher(encoder, int(getattr(encoder, "num_features", 0)), scale, shift, probe), metrics


# ---- training loop ------------------------------------------------------------------------------

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
        for x1, x2 in group:
            y = labels[order[b * micro + rank * per: b * micro + (rank + 1) * per]]
            out.append((torch.cat([x1, x2]), torch.cat([y, y])))
            b += 1
        yield out


def run(cfg: Any, resume: Optional[str] = None) -> Any:
    """Distill as ``cfg`` (a validated DistillConfig) says; returns a RunResult (run_dir, step)."""
    from simclr_tau.data.datasets import build_pretrain_dataset, normalization
    from simclr_tau.data.pipeline import EpochSampler
    from simclr_tau.methods.distill import build_distill_method
    from simclr_tau.models.export import save_encoder
    from simclr_tau.tracking import RunRecord, run_tags
    from simclr_tau.train.loaders import build_loader, global_micro_batch
    from simclr_tau.train.loop import Trainer, last_metric, online_knn_fn, open_run, restore, speed_up, write_run_files
    from simclr_tau.train.optim import build_optimizer, scaled_lr
    from simclr_tau.train.pretrain import RunResult, start_accelerator

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
    ckpt = open_run(run_dir, run_name, resume, accelerator)
    teacher, teacher_metrics = build_teacher(cfg, dataset, image_size, norm, accelerator, run_dir, ckpt is not None)
    method = build_distill_method(cfg, teacher, dataset.channels, steps_per_epoch, total_steps)
    speed_up(method, tc)
    if cfg.model.sync_bn and world > 1:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    optimizer = build_optimizer(cfg.optim, method, cfg.temperature.lr_scale, scaled_lr(cfg.optim, tc.batch_size))
    method, optimizer = accelerator.prepare(method, optimizer)
    core = accelerator.unwrap_model(method)

    start_step, wandb_id = restore(core, optimizer, ckpt, accelerator, not_saved=("teacher.",))  # teacher: on disk
    if is_main:
        write_run_files(run_dir, {"distill.yaml": to_yaml(cfg), "config.yaml": eval_view_yaml(cfg)}, resume, start_step)
    record = RunRecord(run_dir, cfg, run_name, is_main, wandb_id)

    trainer = Trainer(cfg, accelerator, method, optimizer, record, run_dir, run_name, steps_per_epoch, total_steps,
                      online_eval=online_knn_fn(cfg, accelerator, core.encoder, image_size, dataset.channels,
                                                norm.mean, norm.std),
                      not_saved=("teacher.",),
                      postfix_keys=("train/loss", "train/tau_s", "train/T", "train/images_per_s"))

    def batches(epoch: int, skip: int):
        return _with_labels(loader.epoch(epoch, skip, tc.grad_accum), dataset.labels, label_sampler, epoch, skip,
                            tc.grad_accum, micro, world, rank)

    step, stopped_early = trainer.fit(start_step, batches)

    if is_main and not stopped_early:
        save_encoder(run_dir / "encoder.safetensors", core.encoder, cfg.model, dataset.channels, image_size,
                     norm.mean, norm.std)
        record.update_summary({"step": step, "epochs": step / steps_per_epoch, "images": step * tc.batch_size,
                               "final/train_loss": last_metric(run_dir, "train/loss"), **teacher_metrics})
    record.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(run_dir, step, stopped_early)


# ---- command line ---------------------------------------------------------------------------------

def build_parser(prog: str = "simclr-tau distill") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Distill a frozen teacher into a student encoder (SEED or logit KD).")
    p.add_argument("config", help="YAML config (see configs/distill_*.yaml)")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=value, e.g. teacher.path=runs/teacher")
    p.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint of train.run_name), a run directory, or a checkpoint file")
    return p


@exit_on_user_error
def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = load_distill_config(args.config, args.overrides)
    result = run(cfg, resume=args.resume)
    print(f"run directory: {result.run_dir}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
