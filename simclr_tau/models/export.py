"""The exported encoder: ``encoder.safetensors`` = backbone weights + the metadata needed to rebuild it.

Metadata (safetensors' str -> str header): ``format`` = ``simclr_tau.encoder.v1``, ``model`` (JSON of the
ModelConfig: timm name, kwargs, small-stem flag), ``in_chans``, ``image_size``, ``mean``, ``std`` (JSON).

One-line loader: ``encoder, meta = simclr_tau.models.export.load_encoder("runs/x/encoder.safetensors")``.
Without the small-image stem the weights are plain timm weights, so
``timm.create_model(name, num_classes=0, in_chans=C, pretrained=True, pretrained_cfg_overlay=dict(file=path))``
loads them too; with the small stem, ``conv1`` has another shape and :func:`load_encoder` is the way.

A model file is data from anywhere, never trusted code: :func:`read_metadata` accepts exactly the keys above,
``model`` holding only :class:`~simclr_tau.config.ModelConfig` fields of the right types, its ``backbone`` a
plain timm name and its ``backbone_kwargs`` architecture arguments only
(:func:`simclr_tau.models.encoder.check_backbone_kwargs`: no key that makes timm load a file or fetch from the
network). Anything else is one :class:`UserError` line naming the file and the key, before timm sees any of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from omegaconf import OmegaConf
from torch import nn

from simclr_tau.config import ModelConfig
from simclr_tau.errors import UserError
from simclr_tau.fileio import atomic_write
from simclr_tau.models.encoder import (build_encoder, check_backbone_kwargs, check_model_name, encoder_state_dict,
                                       load_encoder_weights)

FORMAT = "simclr_tau.encoder.v1"
KEYS = ("format", "model", "in_chans", "image_size", "mean", "std")  # the whole header; any other key is refused


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
    state = encoder_state_dict(encoder)
    # safetensors writes mode 0600; atomic_write gives the usual 0644 (umask 022) and never half a file
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def _model_fields() -> Dict[str, type]:
    """ModelConfig's fields and the JSON type each must have (from the defaults: bool / int / str / dict)."""
    out = {}
    for f in dataclasses.fields(ModelConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = type(default)
    return out


def _json(meta: Dict[str, str], key: str, where: str) -> Any:
    try:
        return json.loads(meta[key])
    except ValueError as e:
        raise UserError(f"{where} {key} is not valid JSON ({str(e).splitlines()[0]}); re-export the encoder") from None


def _positive_int(meta: Dict[str, str], key: str, where: str) -> int:
    text = meta[key]
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UserError(f"{where} {key}={text!r} is not a positive integer")
    return int(text)


def _check_model(model: Any, where: str) -> Dict[str, Any]:
    """The ``model`` entry: a dict of ModelConfig fields, each of its field's type (bool is not an int)."""
    if not isinstance(model, dict):
        raise UserError(f"{where} model must be a JSON object of ModelConfig fields, not {type(model).__name__}")
    fields = _model_fields()
    if "backbone" not in model:
        raise UserError(f"{where} model has no backbone")
    for key, value in model.items():
        if key not in fields:
            raise UserError(f"{where} model.{key} is refused: not a ModelConfig field (allowed: {', '.join(fields)})")
        want = fields[key]
        ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
        if not ok:
            article = "an" if want is int else "a"
            raise UserError(f"{where} model.{key}={value!r} is refused: must be {article} {want.__name__}")
        if want is int and value < 1:
            raise UserError(f"{where} model.{key}={value!r} is refused: must be positive")
    check_model_name(model["backbone"], f"{where} model.backbone")
    check_backbone_kwargs(model.get("backbone_kwargs", {}), f"{where} model.backbone_kwargs")
    return model


def _check_stats(values: Any, key: str, in_chans: int, where: str) -> List[float]:
    """``mean`` / ``std``: one finite number per input channel (a std also positive)."""
    ok = (isinstance(values, list) and len(values) == in_chans
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  and (key != "std" or v > 0) for v in values))
    if not ok:
        kind = "positive finite numbers" if key == "std" else "finite numbers"
        raise UserError(f"{where} {key}={str(values)[:80]} is refused: must be a list of {in_chans} {kind}")
    return [float(v) for v in values]


def read_metadata(path: str | Path) -> Dict[str, Any]:
    """The validated rebuild metadata of an encoder file: {model, in_chans, image_size, mean, std}.

    Every key of the header is checked (see the module docstring); a malformed or hostile one is a
    :class:`UserError` naming the file and the key.
    """
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
    where = f"{p}: metadata"
    for key in KEYS:
        if key not in meta:
            raise UserError(f"{where} has no {key!r} key; re-export the encoder")
    unknown = sorted(set(meta) - set(KEYS))
    if unknown:
        raise UserError(f"{where} key {unknown[0]!r} is refused: not one of {', '.join(KEYS)}")
    in_chans = _positive_int(meta, "in_chans", where)
    return {
        "model": _check_model(_json(meta, "model", where), where),
        "in_chans": in_chans,
        "image_size": _positive_int(meta, "image_size", where),
        "mean": _check_stats(_json(meta, "mean", where), "mean", in_chans, where),
        "std": _check_stats(_json(meta, "std", where), "std", in_chans, where),
    }


def load_encoder(path: str | Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild and load an exported encoder. Returns (encoder in eval mode, metadata)."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
    encoder, _ = build_encoder(model_cfg, meta["in_chans"])
    load_encoder_weights(encoder, load_file(str(path)), str(path))
    return encoder.eval(), meta
