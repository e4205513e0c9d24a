"""The exported encoder: ``encoder.safetensors`` = backbone weights + the metadata needed to rebuild it, and,
where timm alone can rebuild the architecture, a timm ``config.json`` next to it.

Metadata (safetensors' str -> str header): ``format`` = ``simclr_tau.encoder.v1``, ``model`` (JSON of the
ModelConfig: timm name, kwargs, stem flags), ``in_chans``, ``image_size``, ``mean``, ``std`` (JSON) and ``timm``
(JSON ``{"loadable": bool, "note": str}``: whether plain timm rebuilds this encoder, and how or why not;
exports older than it lack the key).

Two ways to load it:

- ``encoder, meta = simclr_tau.models.export.load_encoder("runs/x/encoder.safetensors")``: every export; the
  model is a timm model whose ``pretrained_cfg`` carries the encoder's input size, mean and std, so
  ``timm.data.resolve_data_config({}, model=encoder)`` gives its preprocessing.
- plain timm, ``timm.create_model("local-dir:runs/x", pretrained=True)``: the ``config.json`` written next to
  the file (timm's Hugging Face layout: architecture, ``model_args`` = ``in_chans`` + ``backbone_kwargs``,
  ``pretrained_cfg`` with the encoder's input size / mean / std) rebuilds the architecture and timm finds the
  weights file beside it. Only for encoders that ``timm.create_model(backbone, **backbone_kwargs)`` builds
  as trained: ``model.small_stem`` (3x3 stride-1 stem without max-pool) and ``model.stem_pool=false`` change
  the stem in ways no timm argument expresses. Those exports get no ``config.json``, and their weights carry
  one extra one-byte tensor (:data:`NOT_TIMM_KEY` + the reason) that timm's strict load rejects by name, so
  ``pretrained_cfg_overlay=dict(file=...)`` fails instead of silently running the ImageNet stem on the
  trained weights (resnet10t's stride-2 and stride-1 stems have the same weight shapes).

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import OmegaConf
from torch import nn

from simclr_tau.config import ModelConfig
from simclr_tau.errors import UserError
from simclr_tau.fileio import atomic_write
from simclr_tau.models.encoder import (build_encoder, check_backbone_kwargs, check_model_name, encoder_state_dict,
                                       load_encoder_weights)

FORMAT = "simclr_tau.encoder.v1"
KEYS = ("format", "model", "in_chans", "image_size", "mean", "std")  # every export has these
OPTIONAL_KEYS = ("timm",)  # exports before issue 19 lack it; any other key is refused
TIMM_CONFIG = "config.json"  # the name timm's local-dir: (and the Hugging Face hub) reads
NOT_TIMM_KEY = "simclr_tau.not_a_timm_architecture."  # + reason: the marker tensor of an export timm cannot rebuild
_NOT_TIMM_WHY = {
    "small_stem": "model.small_stem=true keeps the stem at full resolution (its first conv at stride 1; for a plain "
                  "ResNet a 3x3 conv, and no max-pool)",
    "stem_pool_false": "model.stem_pool=false removes the stem's max-pool",
    "modified": "the stem differs from timm's",
}


def data_config(in_chans: int, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Dict[str, Any]:
    """timm's preprocessing keys for the encoder's evaluation transform
    (:func:`simclr_tau.data.augment.eval_transform`: bilinear resize of the short side to S, center crop, normalize)."""
    return {"input_size": [in_chans, image_size, image_size], "interpolation": "bilinear", "crop_pct": 1.0,
            "crop_mode": "center", "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def timm_mismatch(model: Dict[str, Any], in_chans: int) -> Optional[str]:
    """None if ``timm.create_model(backbone, in_chans=C, num_classes=0, **backbone_kwargs)`` builds the encoder's
    architecture (the same modules with the same arguments), else the reason (a key of ``_NOT_TIMM_WHY``).

    Both are built fresh (the RNG state is kept), so the answer does not depend on the trained module."""
    import timm

    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
    with torch.random.fork_rng(devices=[]):
        ours, _ = build_encoder(cfg, in_chans)
        kwargs = OmegaConf.to_container(cfg.backbone_kwargs, resolve=True) if cfg.backbone_kwargs else {}
        plain = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    if repr(ours) == repr(plain):
        return None
    return "small_stem" if cfg.small_stem else "stem_pool_false" if not cfg.stem_pool else "modified"


def timm_config(encoder: nn.Module, model: Dict[str, Any], in_chans: int, image_size: int,
                mean: Sequence[float], std: Sequence[float]) -> Dict[str, Any]:
    """The ``config.json`` timm reads for ``timm.create_model("local-dir:DIR", pretrained=True)``: the architecture,
    its arguments (``in_chans``, no classifier, ``backbone_kwargs``) and a ``pretrained_cfg`` with the encoder's
    preprocessing (the layout of timm's ``save_for_hf``, without the ImageNet tag, licence and URLs of the
    architecture's default weights, which these are not)."""
    default = getattr(encoder, "pretrained_cfg", None) or {}
    return {
        "architecture": model["backbone"],
        "num_classes": 0,
        "num_features": int(getattr(encoder, "num_features")),
        "model_args": {"in_chans": in_chans, "num_classes": 0, **(model.get("backbone_kwargs") or {})},
        "pretrained_cfg": {
            "tag": "simclr_tau", "custom_load": False, **data_config(in_chans, image_size, mean, std),
            "fixed_input_size": bool(default.get("fixed_input_size", False)), "num_classes": 0,
            "first_conv": default.get("first_conv"), "classifier": default.get("classifier"),
        },
    }


def save_encoder(
    path: str | Path, encoder: nn.Module, model_cfg: Any, in_chans: int, image_size: int,
    mean: Sequence[float], std: Sequence[float],
) -> None:
    """Write the encoder's weights and rebuild metadata to ``path`` (safetensors) and, when plain timm rebuilds
    the architecture, timm's ``config.json`` next to it (else the weights get the :data:`NOT_TIMM_KEY` marker,
    and a ``config.json`` of an earlier export to the same directory is removed)."""
    from safetensors.torch import save_file

    path = Path(path)
    model = OmegaConf.to_container(model_cfg, resolve=True) if not isinstance(model_cfg, dict) else dict(model_cfg)
    mismatch = timm_mismatch(model, in_chans)
    if mismatch is None:
        timm_note = {"loadable": True, "note": f"timm.create_model('local-dir:<this directory>', pretrained=True) "
                                               f"reads {TIMM_CONFIG} next to this file"}
    else:
        timm_note = {"loadable": False, "note": f"not loadable by plain timm: {_NOT_TIMM_WHY[mismatch]}, which no "
                                                "timm argument builds; use simclr_tau.models.export.load_encoder"}
    meta = {
        "format": FORMAT,
        "model": json.dumps(model),
        "in_chans": str(in_chans),
        "image_size": str(image_size),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "timm": json.dumps(timm_note),
    }
    state = encoder_state_dict(encoder)
    if mismatch is not None:
        # timm's strict load refuses a key it does not know, and names it: the reason travels in the name
        state[NOT_TIMM_KEY + mismatch] = torch.zeros(1, dtype=torch.uint8)
    # safetensors writes mode 0600; atomic_write gives the usual 0644 (umask 022) and never half a file
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    config_json = path.parent / TIMM_CONFIG
    if mismatch is None:
        text = json.dumps(timm_config(encoder, model, in_chans, image_size, mean, std), indent=2)
        atomic_write(config_json, lambda tmp: tmp.write_text(text))
    elif _is_our_timm_config(config_json):
        config_json.unlink()


def _is_our_timm_config(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("pretrained_cfg", {}).get("tag") == "simclr_tau"
    except (OSError, ValueError, AttributeError):
        return False


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
    unknown = sorted(set(meta) - set(KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise UserError(f"{where} key {unknown[0]!r} is refused: not one of {', '.join(KEYS + OPTIONAL_KEYS)}")
    in_chans = _positive_int(meta, "in_chans", where)
    return {
        "model": _check_model(_json(meta, "model", where), where),
        "in_chans": in_chans,
        "image_size": _positive_int(meta, "image_size", where),
        "mean": _check_stats(_json(meta, "mean", where), "mean", in_chans, where),
        "std": _check_stats(_json(meta, "std", where), "std", in_chans, where),
        "timm": _check_timm_note(_json(meta, "timm", where), where) if "timm" in meta else None,
    }


def _check_timm_note(note: Any, where: str) -> Dict[str, Any]:
    """The ``timm`` entry: {"loadable": bool, "note": str} (only ever shown, never acted on)."""
    ok = (isinstance(note, dict) and set(note) == {"loadable", "note"} and isinstance(note["loadable"], bool)
          and isinstance(note["note"], str) and len(note["note"]) <= 1000)
    if not ok:
        raise UserError(f"{where} timm={str(note)[:80]} is refused: must be a JSON object "
                        "{\"loadable\": true|false, \"note\": \"...\"}")
    return note


def encoder_weights(path: str | Path) -> Dict[str, torch.Tensor]:
    """The encoder's state dict stored in an export (the :data:`NOT_TIMM_KEY` marker left out)."""
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(path)).items() if not k.startswith(NOT_TIMM_KEY)}


def load_encoder(path: str | Path) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild and load an exported encoder. Returns (encoder in eval mode, metadata).

    The encoder's timm ``pretrained_cfg`` is set to its own preprocessing (input size, mean, std: see
    :func:`data_config`), so ``timm.data.resolve_data_config({}, model=encoder)`` and the transforms timm builds
    from it match the encoder rather than the ImageNet defaults of its architecture."""
    meta = read_metadata(path)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"])
    encoder, _ = build_encoder(model_cfg, meta["in_chans"])
    load_encoder_weights(encoder, encoder_weights(path), str(path))
    default = getattr(encoder, "pretrained_cfg", None) or {}
    cfg = {k: default[k] for k in ("architecture", "fixed_input_size", "first_conv", "classifier") if k in default}
    data = data_config(meta["in_chans"], meta["image_size"], meta["mean"], meta["std"])
    cfg.update(tag="simclr_tau", num_classes=0, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    encoder.pretrained_cfg = cfg
    if hasattr(encoder, "default_cfg"):
        encoder.default_cfg = cfg  # timm's older name for the same dict
    return encoder.eval(), meta
