"""The exported encoder: ``encoder.safetensors`` = backbone weights + the metadata needed to rebuild it.

Metadata (safetensors' str -> str header): ``format`` = ``simclr_tau.encoder.v1``, ``model`` (JSON of the
ModelConfig: timm name, kwargs, small-stem flag), ``in_chans``, ``image_size``, ``mean``, ``std`` (JSON).

One-line loader: ``encoder, meta = simclr_tau.models.export.load_encoder("runs/x/encoder.safetensors")``.
Without the small-image stem the weights are plain timm weights, so
``timm.create_model(name, num_classes=0, in_chans=C, pretrained=True, pretrained_cfg_overlay=dict(file=path))``
loads them too; with the small stem, ``conv1`` has another shape and :func:`load_encoder` is the way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from omegaconf import OmegaConf
from torch import nn

from simclr_tau.config import ModelConfig
from simclr_tau.errors import UserError
from simclr_tau.models.encoder import build_encoder, encoder_state_dict, load_encoder_weights

FORMAT = "simclr_tau.encoder.v1"


def save_encoder(
    path: str | Path, encoder: nn.Module, model_cfg: Any, in_chans: int, image_size: int,
    mean: Sequence[float], std: Sequence[float],
) -> None:
    """Write the encoder's weights and rebuild metadata to ``path`` (safetensors)."""
    from safetensors.torch import save_file

    model = OmegaConf.to_container(model_cfg, resolve=True) if not isinstance(model_cfg, dict) else dict(model_cfg)
    meta = {
        "format": FORMAT,
        "model": json.dumps(model),
        "in_chans": str(in_chans),
        "image_size": str(image_size),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(encoder_state_dict(encoder), str(path), metadata=meta)


def read_metadata(path: str | Path) -> Dict[str, Any]:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise UserError(f"encoder file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise UserError(f"{p} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{p} is not a simclr_tau encoder export (metadata format={meta.get('format')!r})")
    return {
        "model": json.loads(meta["model"]),
        "in_chans": int(meta["in_chans"]),
        "image_size": int(meta["image_size"]),
        "mean": json.loads(meta["mean"]),
        "std": json.loads(meta["std"]),
    }


def load_encoder(path: str | Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild and load an exported encoder. Returns (encoder in eval mode, metadata)."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
    encoder, _ = build_encoder(model_cfg, meta["in_chans"])
    load_encoder_weights(encoder, load_file(str(path)), str(path))
    return encoder.eval(), meta
