"""The frozen teacher of a distillation run: its encoder from a run directory, an ``encoder.safetensors`` or a
pretraining checkpoint, and (for logit KD) its linear probe, trained here or loaded.

The teacher (``teacher.path``) is a run directory (its ``encoder.safetensors``, else its newest valid
checkpoint), an ``encoder.safetensors``, or a pretraining checkpoint ``step_*.pt`` (architecture from
``teacher.model`` or the run's ``config.yaml``). The kd teacher's linear probe is ``teacher.probe`` or is
trained here (L-BFGS on the teacher's features of the labelled training set, hyperparameters chosen on a
held-out split, :func:`simclr_tau.evaluation.linear_probe.linear_probe`) and saved as
``<run>/teacher_probe.safetensors`` (reused on resume).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from omegaconf import OmegaConf

from simclr_tau.config import ModelConfig
from simclr_tau.errors import UserError
from simclr_tau.fileio import atomic_write


def load_teacher_encoder(tc: Any, in_chans: int) -> Tuple[torch.nn.Module, Dict[str, Any], str]:
    """(frozen encoder, metadata {image_size, mean, std} (None = the student's), description). UserError if unusable."""
    from simclr_tau.models.encoder import build_encoder, load_encoder_weights
    from simclr_tau.models.export import encoder_weights, load_encoder
    from simclr_tau.train.checkpoint import latest_valid_checkpoint, load_checkpoint

    p = Path(tc.path)
    if not p.exists():
        raise UserError(f"teacher.path={p}: no such run directory, encoder file or checkpoint")
    run_dir: Path | None = None
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
                load_encoder_weights(encoder, encoder_weights(p), f"teacher.path={p}")
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
        tensors = {k: v.contiguous().cpu() for k, v in probe.items()}
        atomic_write(saved, lambda tmp: save_file(tensors, str(tmp)))  # a resumed run never reads half a probe
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
