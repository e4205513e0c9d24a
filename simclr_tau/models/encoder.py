"""Encoders: any timm model, returning pooled features (B, F).

``timm.create_model(name, num_classes=0, in_chans=C)`` gives a backbone whose forward returns the pooled
feature vector. For 28-32 px images the ImageNet stem (7x7 stride-2 conv + max-pool) throws away 3/4 of
the resolution before the first block, so ``small_stem`` swaps it for a 3x3 stride-1 conv without
max-pool, as the SimCLR paper does for CIFAR-10 (Appendix B.9).
"""

from __future__ import annotations

import difflib
from typing import Any, Tuple

import timm
import torch
from torch import nn

from simclr_tau.errors import UserError


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"model.backbone='{name}' is not a timm model{hint}")


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
    """Build the backbone a :class:`~simclr_tau.config.ModelConfig` names. Returns (module, feature dim)."""
    _check_model_name(cfg.backbone)
    kwargs = dict(cfg.get("backbone_kwargs", None) or {}) if hasattr(cfg, "get") else dict(getattr(cfg, "backbone_kwargs", {}) or {})
    try:
        model = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except TypeError as e:
        raise UserError(f"model.backbone_kwargs={kwargs} not accepted by timm model '{cfg.backbone}': {e}") from None
    if cfg.small_stem:
        _apply_small_stem(model)
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
