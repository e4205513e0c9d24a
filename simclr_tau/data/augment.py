"""The SimCLR augmentation recipe (Chen et al. 2020, "A Simple Framework for Contrastive Learning of
Visual Representations", Appendix A), per sample with torchvision.transforms.v2 (CPU DataLoader path).

One view of a uint8 image (C, H, W), C in {1, 3}, is, in this order:

    1. random resized crop, area fraction U(crop_scale_min, 1), log aspect ratio U(log 3/4, log 4/3),
       resized (bilinear) to S x S
    2. horizontal flip                                  with p = flip_p (0.5)
    3. color jitter, the 4 ops in a random order        with p = jitter_p (0.8)
       brightness/contrast/saturation factors U(max(0, 1 - 0.4 s), 1 + 0.4 s), hue shift U(-0.1 s, 0.1 s)
    4. grayscale                                        with p = grayscale_p (0.2)
    5. Gaussian blur, kernel ≈ 0.1 S (odd, >= 3), sigma U(0.1, 2.0)   with p = blur_p
    6. solarize (x -> 1 - x where x >= 0.5)             with p = solarize_p (0)
    7. normalize with the dataset mean / std

The jitter strength s (``AugmentConfig.jitter_strength``) is defined so that the default s = 1 gives
brightness = contrast = saturation = 0.4 and hue = 0.1, SimCLR's CIFAR-10 setting: factors 0.4 s / 0.1 s
here, where the paper writes 0.8 s' / 0.2 s' and uses s' = 0.5 on CIFAR (so s = 2 s'; s = 2 is the
paper's ImageNet strength s' = 1).

Image-size-aware defaults (config field None): crop_scale_min = 0.08 at >= 96 px, 0.2 below (a 0.08
crop of a 28 px image is 8 px); blur_p = 0.5 at >= 96 px, 0 below (blur destroys 28-32 px images).
Grayscale images (C = 1): saturation, hue and grayscale are skipped (they are no-ops on one channel);
brightness and contrast apply.

Every step works on float32 in [0, 1] (the uint8 input is scaled first), so this pipeline and
:class:`simclr_tau.data.batch_augment.BatchAugment` compute the same function of the same parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torchvision.transforms import v2

from simclr_tau.config.resolve import LARGE_IMAGE, augment_size_defaults  # noqa: F401 (LARGE_IMAGE: re-exported)
from simclr_tau.errors import UserError

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of the random resized crop
BLUR_SIGMA = (0.1, 2.0)  # range of the Gaussian blur's standard deviation, in pixels
SOLARIZE_THRESHOLD = 0.5  # on [0, 1] floats; uint8 128 maps to 0.502, 127 to 0.498: same as 128 on uint8

_PROBABILITIES = ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p")


def resolve_augment(cfg: Any, image_size: int) -> dict:
    """Fill the image-size-aware defaults of an ``AugmentConfig`` (or DictConfig) and check ranges.

    Returns a dict with keys crop_scale_min, flip_p, brightness, contrast, saturation, hue, jitter_p,
    grayscale_p, blur_p, blur_kernel, solarize_p, enabled (floats, an int kernel size, a bool).
    Raises :class:`UserError` naming ``augment.<field>`` for an out-of-range value.

    Example:
        >>> from simclr_tau.config import AugmentConfig
        >>> p = resolve_augment(AugmentConfig(), 28)
        >>> (p["crop_scale_min"], p["blur_p"], p["brightness"], p["hue"])
        (0.2, 0.0, 0.4, 0.1)
    """
    if int(image_size) < 1:
        raise UserError(f"image_size={image_size} must be >= 1")
    size_defaults = augment_size_defaults(int(image_size))  # the rule: simclr_tau.config.resolve
    s = float(cfg.jitter_strength)
    if not 0.0 <= s <= 5.0:  # hue = 0.1 s must stay within torchvision's [0, 0.5]
        raise UserError(f"augment.jitter_strength={s} must lie in [0, 5] (hue shift 0.1 s <= 0.5)")
    out = {
        "crop_scale_min": float(cfg.crop_scale_min) if cfg.crop_scale_min is not None else size_defaults["crop_scale_min"],
        "flip_p": float(cfg.flip_p),
        "brightness": 0.4 * s,
        "contrast": 0.4 * s,
        "saturation": 0.4 * s,
        "hue": 0.1 * s,
        "jitter_p": float(cfg.jitter_p),
        "grayscale_p": float(cfg.grayscale_p),
        "blur_p": float(cfg.blur_p) if cfg.blur_p is not None else size_defaults["blur_p"],
        # SimCLR: 10% of the side, made odd (224 px -> 23); at least 3
        "blur_kernel": max(3, int(0.1 * image_size) // 2 * 2 + 1),
        "solarize_p": float(cfg.solarize_p),
        "enabled": bool(cfg.enabled),
    }
    if not 0.0 < out["crop_scale_min"] <= 1.0:
        raise UserError(f"augment.crop_scale_min={out['crop_scale_min']} must lie in (0, 1]")
    for name in _PROBABILITIES:
        if not 0.0 <= out[name] <= 1.0:
            raise UserError(f"augment.{name}={out[name]} is a probability and must lie in [0, 1]")
    return out


def check_stats(channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
    """Raise ValueError unless ``channels`` is 1 or 3 and mean/std have one positive-std entry per channel."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels}")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values (one per channel); got {len(mean)} and {len(std)}")
    if any(not v > 0 for v in std):
        raise ValueError(f"std values must be > 0; got {list(std)}")


def eval_transform(image_size: int, channels: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Tensor], Tensor]:
    """uint8 (C, H, W) -> float32 (C, S, S): scale to [0, 1], resize the short side to S (bilinear,
    antialiased; identity when already S) and center-crop S x S, normalize. No randomness."""
    check_stats(channels, mean, std)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.Normalize(list(mean), list(std)),
            v2.ToPureTensor(),
        ]
    )


def simclr_view_transform(
    cfg: Any, image_size: int, channels: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Tensor], Tensor]:
    """One random SimCLR view, uint8 (C, H, W) -> float32 (C, S, S); call it twice for two views.

    Draws from torch's global RNG (DataLoader workers are seeded per worker by PyTorch).
    ``cfg.enabled`` False gives :func:`eval_transform` (identity views).

    Example:
        >>> from simclr_tau.config import AugmentConfig
        >>> t = simclr_view_transform(AugmentConfig(), 28, 1, [0.286], [0.353])
        >>> t(torch.zeros(1, 28, 28, dtype=torch.uint8)).shape
        torch.Size([1, 28, 28])
    """
    p = resolve_augment(cfg, image_size)
    check_stats(channels, mean, std)
    if not p["enabled"]:
        return eval_transform(image_size, channels, mean, std)
    rgb = channels == 3
    jitter = v2.ColorJitter(
        brightness=p["brightness"],
        contrast=p["contrast"],
        saturation=p["saturation"] if rgb else 0.0,  # 0 = skipped; a no-op on one channel anyway
        hue=p["hue"] if rgb else 0.0,
    )
    steps = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomResizedCrop(image_size, scale=(p["crop_scale_min"], 1.0), ratio=CROP_RATIO, antialias=True),
        v2.RandomHorizontalFlip(p["flip_p"]),
        v2.RandomApply([jitter], p=p["jitter_p"]),
    ]
    if rgb:
        steps.append(v2.RandomGrayscale(p["grayscale_p"]))
    if p["blur_p"] > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(p["blur_kernel"], sigma=BLUR_SIGMA)], p=p["blur_p"]))
    if p["solarize_p"] > 0:
        steps.append(v2.RandomSolarize(SOLARIZE_THRESHOLD, p=p["solarize_p"]))
    steps += [v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]
    return v2.Compose(steps)

