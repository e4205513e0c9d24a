"""What an evaluation command evaluates: its TARGET argument resolved into an encoder, a config and an
output directory (:class:`Target`), its datasets, and its (cached) features.

TARGET is a run directory (config.yaml + encoder.safetensors), an ``encoder.safetensors`` (its run's
config.yaml next to it is used, else ``--config`` YAML or ``--data NAME``), or ``pixels`` (the raw-pixel
baseline; the data come from ``--config`` / ``--data`` / overrides). ``random_init`` evaluates the same
architecture with fresh seeded weights (the baseline a pretrained encoder must beat).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from simclr_tau.errors import UserError

PIXELS = "pixels"


@dataclass
class Target:
    """What is evaluated, on which data, and where results go."""

    kind: str  # run | encoder | pixels
    description: str
    encoder: nn.Module
    cfg: Any  # the effective config (run config + overrides)
    image_size: int
    channels: int
    mean: List[float]
    std: List[float]
    out_dir: Path
    run_dir: Optional[Path] = None  # set when results belong to a pretraining run (summary.json)
    encoder_id: Optional[str] = None  # cache identity; None disables the cache
    random_init: bool = False


def _load_cfg(config: Optional[str], data: Optional[str], overrides: Sequence[str]) -> Any:
    from simclr_tau.config import load_config

    extra = [f"data.name={data}"] if data else []
    return load_config(config, list(extra) + list(overrides))


def resolve_target(target: str, config: Optional[str] = None, data: Optional[str] = None,
                   overrides: Sequence[str] = (), random_init: bool = False, seed: int = 0,
                   out: Optional[str] = None) -> Target:
    """Turn the TARGET argument into a :class:`Target` (encoder loaded, config resolved). UserError if unusable."""
    from omegaconf import OmegaConf

    from simclr_tau.config import ModelConfig
    from simclr_tau.evaluation.features import PixelEncoder, file_digest, module_digest
    from simclr_tau.models.encoder import build_encoder
    from simclr_tau.models.export import load_encoder, read_metadata

    if target == PIXELS:
        if random_init:
            raise UserError("--random-init does not apply to the pixels baseline")
        cfg = _load_cfg(config, data, overrides)
        from simclr_tau.data.datasets import build_eval_datasets, normalization

        train_ds, _ = build_eval_datasets(cfg.data)
        norm = normalization(cfg.data.name, train_ds)
        out_dir = Path(out) if out else Path(cfg.train.output_dir) / f"pixels-{cfg.data.name}" / "eval"
        return Target(PIXELS, f"pixels ({cfg.data.name})", PixelEncoder(), cfg,
                      cfg.data.image_size or train_ds.image_size, train_ds.channels, list(norm.mean), list(norm.std), out_dir)

    path = Path(target)
    if not path.exists():
        raise UserError(f"{path}: no such run directory or encoder file (or use 'pixels')")
    run_dir: Optional[Path] = None
    if path.is_dir():
        enc_path = path / "encoder.safetensors"
        if not (path / "config.yaml").is_file():
            raise UserError(f"{path}: not a run directory (no config.yaml)")
        if not enc_path.is_file():
            raise UserError(f"{path}: no encoder.safetensors (pretraining not finished? export it first)")
        run_dir = path
    else:
        enc_path = path
        if (path.parent / "config.yaml").is_file():
            run_dir = path.parent
    if config is not None:
        cfg = _load_cfg(config, data, overrides)
    elif run_dir is not None:
        cfg = _load_cfg(str(run_dir / "config.yaml"), data, overrides)
    elif data is not None:
        cfg = _load_cfg(None, data, overrides)
    else:
        raise UserError(f"{path}: an encoder file outside a run directory needs --config CONFIG.yaml or --data NAME")

    if random_init:
        meta = read_metadata(enc_path)
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder, _ = build_encoder(model_cfg, meta["in_chans"])
        encoder.eval()
        encoder_id = f"random-init:{module_digest(encoder)}"
    else:
        encoder, meta = load_encoder(enc_path)
        encoder_id = f"file:{file_digest(enc_path)}"
    base = run_dir if run_dir is not None else enc_path.parent
    out_dir = Path(out) if out else base / "eval"
    desc = f"{enc_path}{' (random init, seed %d)' % seed if random_init else ''}"
    return Target("run" if run_dir is not None else "encoder", desc, encoder, cfg, meta["image_size"],
                  meta["in_chans"], list(meta["mean"]), list(meta["std"]), out_dir, run_dir, encoder_id, random_init)


def load_data(t: Target) -> Tuple[Any, Any]:
    """(train, test) datasets of the target's config, checked against the encoder's input channels."""
    from simclr_tau.data.datasets import build_eval_datasets

    train_ds, test_ds = build_eval_datasets(t.cfg.data)
    if train_ds.channels != t.channels:
        fix = "rgb" if t.channels == 3 else "native"
        raise UserError(f"the encoder expects {t.channels}-channel images but data.name={t.cfg.data.name} gives "
                        f"{train_ds.channels}; add data.channels={fix}")
    if train_ds.num_classes != test_ds.num_classes:
        raise UserError(f"data.name={t.cfg.data.name}: train and test splits have {train_ds.num_classes} and "
                        f"{test_ds.num_classes} classes")
    return train_ds, test_ds


def target_features(t: Target, train_ds: Any, test_ds: Any, batch_size: int, accelerator: Any = None,
                    use_cache: bool = True, num_workers: int = 0, progress: bool = False
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Dict[str, bool]]:
    """Clean (eval-transform) features of both splits, through the cache when the target has an identity."""
    from simclr_tau.data.augment import eval_transform
    from simclr_tau.evaluation.features import cached_features, dataset_identity

    transform = eval_transform(t.image_size, t.channels, t.mean, t.std)
    transform_id = {"kind": "eval", "image_size": t.image_size, "mean": t.mean, "std": t.std}
    cache_dir = t.out_dir / "cache" if (use_cache and t.encoder_id) else None
    d = t.cfg.data
    out, hits = [], {}
    for split, ds in (("train", train_ds), ("test", test_ds)):
        f, y, hit = cached_features(
            t.encoder, ds, transform, cache_dir=cache_dir, encoder_id=t.encoder_id or "",
            dataset_id=dataset_identity(ds, d.name, d.root, split), transform_id=transform_id,
            batch_size=batch_size, accelerator=accelerator, num_workers=num_workers, progress=progress)
        out += [f, y]
        hits[split] = hit
    return out[0], out[1], out[2], out[3], hits
