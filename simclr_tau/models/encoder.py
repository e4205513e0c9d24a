"""Encoders: any timm model, returning pooled features (B, F).

``timm.create_model(name, num_classes=0, in_chans=C)`` gives a backbone whose forward returns the pooled
feature vector. For 28-32 px images the ImageNet stem (7x7 stride-2 conv + max-pool) throws away 3/4 of
the resolution before the first block, so ``small_stem`` swaps it for a 3x3 stride-1 conv without
max-pool, as the SimCLR paper does for CIFAR-10 (Appendix B.9). ``stem_pool=False`` is the middle way:
the ImageNet stem's strided conv without its max-pool (28 px -> 14 px into the first stage, not 7 or 28).
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Dict, Tuple

import timm
import torch
from torch import nn

from simclr_tau.errors import UserError


# ---- what may reach timm.create_model ------------------------------------------------------------------
# backbone_kwargs come from configs and from model files (encoder.safetensors metadata, a run's config.yaml),
# which are data, never trusted code: timm.create_model also takes keys that load another file (checkpoint_path,
# pretrained_cfg_overlay=dict(file=...)), fetch from the network (hf_hub_id, url) or return another kind of
# model (features_only). The rule, for every source:
#   * a key is a Python identifier, not one of STEERING_KEYS, and not path-like: no '_'-separated part of it is
#     in PATH_PARTS, and it does not end in 'path' / 'paths' (drop_path_rate is fine: its last part is 'rate');
#   * a value is a plain None / bool / int / float / str, or a list of those; a str holds no '/', '\\' or ':'
#     and does not start with '.' or '~' (a path or URL as a value is refused too); no dict, no nested list.
# in_chans and num_classes are set by simclr_tau (SET_BY_US); pretrained is always False.
STEERING_KEYS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "pretrained_filter_fn",
    "pretrained_model_args", "checkpoint_path", "cache_dir", "file", "url", "hf_hub_id", "hf_hub_filename",
    "features_only", "feature_cfg", "feature_cls", "out_indices", "model_cfg", "kwargs_filter", "pruned",
    "scriptable", "exportable", "no_jit",
})
SET_BY_US = frozenset({"in_chans", "num_classes"})
PATH_PARTS = frozenset({"file", "files", "dir", "dirs", "url", "uri", "hub", "cache", "checkpoint", "ckpt",
                        "pretrained", "cfg", "config", "weights", "root", "load", "source", "filename", "location"})
_PLAIN_MODEL_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")  # timm name[.pretrained_tag], no 'hf-hub:' / path


def _value_problem(value: Any) -> str | None:
    """Why ``value`` may not be a backbone_kwargs value, or None."""
    if isinstance(value, list):
        for v in value:
            if isinstance(v, (list, tuple, dict)):
                return "a nested container (only a flat list of plain values is accepted)"
            problem = _value_problem(v)
            if problem:
                return problem
        return None
    if value is None or isinstance(value, (bool, int, float)):
        return None
    if isinstance(value, str):
        if any(c in value for c in "/\\:") or value.startswith((".", "~")):
            return f"the value {value!r} looks like a path or URL"
        return None
    return f"a {type(value).__name__} value (only None, bool, int, float, str or a flat list of them)"


def check_backbone_kwargs(kwargs: Any, where: str = "model.backbone_kwargs") -> Dict[str, Any]:
    """``kwargs`` as a plain dict if every key and value passes the rule above, else a UserError naming
    ``where``.KEY (``where`` says where the kwargs came from: a config key or a model file's metadata)."""
    if not isinstance(kwargs, dict):
        raise UserError(f"{where} must be a mapping of timm model arguments, not {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise UserError(f"{where}: the key {key!r} is refused: not a Python identifier")
        if key in SET_BY_US:
            raise UserError(f"{where}.{key} is refused: simclr_tau sets it (the data's channels; no classifier head)")
        parts = set(key.lower().split("_"))
        if key in STEERING_KEYS or parts & PATH_PARTS or key.lower().endswith(("path", "paths")):
            raise UserError(f"{where}.{key} is refused: it would make timm load a file, fetch from the network "
                            "or build another kind of model; only architecture arguments are accepted")
        problem = _value_problem(value)
        if problem:
            raise UserError(f"{where}.{key} is refused: {problem}")
    return dict(kwargs)


def check_model_name(name: Any, where: str = "model.backbone") -> str:
    """``name`` if it is a registered timm model name (no 'hf-hub:' / 'local-dir:' source, no path)."""
    if not isinstance(name, str) or not _PLAIN_MODEL_NAME.fullmatch(name):
        raise UserError(f"{where}={name!r} is refused: not a plain timm model name (letters, digits, '_', one '.tag')")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"{where}='{name}' is not a timm model{hint}")
    return name


def _apply_small_stem(model: nn.Module) -> bool:
    """Make the stem keep full resolution. Returns True if the model was changed."""
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and hasattr(model, "maxpool"):
        # ResNet family: 7x7/2 conv + maxpool -> 3x3/1 conv, no pool.
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return True
    if isinstance(conv1, nn.Sequential) and hasattr(model, "maxpool"):
        # ResNet deep-stem variants (resnet10t, resnet26d, ...): first conv stride 2 -> 1, no pool.
        first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
        model.maxpool = nn.Identity()
        return True
    if hasattr(model, "patch_embed"):
        return False  # ViT-style: the patch size sets the resolution (choose it with backbone_kwargs)
    # Other conv families (RegNet, EfficientNet, ...): turn the first strided conv into a stride-1 one.
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (1, 1)
            return True
    return False


def build_encoder(cfg: Any, in_chans: int) -> Tuple[nn.Module, int]:
    """Build the backbone a :class:`~simclr_tau.config.ModelConfig` names. Returns (module, feature dim).

    The name and ``backbone_kwargs`` pass :func:`check_model_name` and :func:`check_backbone_kwargs` first,
    whatever their source, so nothing but architecture arguments reaches ``timm.create_model``.
    """
    from omegaconf import DictConfig, OmegaConf

    check_model_name(cfg.backbone)
    raw = cfg.get("backbone_kwargs", None) if hasattr(cfg, "get") else getattr(cfg, "backbone_kwargs", None)
    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    kwargs = check_backbone_kwargs(raw or {})
    try:
        model = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise UserError(f"model.backbone_kwargs={kwargs} not accepted by timm model '{cfg.backbone}': {e}") from None
    if cfg.small_stem:
        _apply_small_stem(model)
    elif not getattr(cfg, "stem_pool", True):
        if not isinstance(getattr(model, "maxpool", None), nn.Module):
            raise UserError(f"model.stem_pool=false: timm model '{cfg.backbone}' has no stem max-pool to remove "
                            "(a ResNet-family stem has one)")
        model.maxpool = nn.Identity()
    return model, int(model.num_features)


def encoder_state_dict(encoder: nn.Module) -> dict:
    """The encoder's weights with contiguous CPU tensors (ready for safetensors)."""
    return {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}


@torch.no_grad()
def load_encoder_weights(encoder: nn.Module, state: dict, source: str) -> None:
    """Load ``state`` strictly; a mismatch raises a UserError listing the mismatched keys."""
    own = encoder.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''} ({len(keys)})")
        raise UserError(f"{source} does not match the encoder architecture: " + "; ".join(parts))
    encoder.load_state_dict(state)
