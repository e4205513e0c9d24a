"""The defaults a run resolves when it starts: config fields that default to ``None`` (a dataset's native
size, an image-size-aware augmentation, a τ mode's bounds) and what they become.

Each rule lives here once and is used by the code that applies it (:mod:`simclr_tau.data.augment`,
:mod:`simclr_tau.data.datasets`, :mod:`simclr_tau.temperature`) and by :func:`resolve_defaults`, which
writes the resolved values into a copy of a config: what ``simclr-tau config`` prints and what a run saves
as ``config.yaml``. Filled, where the field is None:

- ``data.image_size``: the dataset's native side (:data:`NATIVE_IMAGE_SIZE`; synthetic:
  ``data.synthetic_image_size``). A mixture's comes from its sources' images: only a run fills it.
- ``augment.crop_scale_min`` (0.08 at >= :data:`LARGE_IMAGE` px, 0.2 below) and ``augment.blur_p``
  (0.5 / 0), given the image size.
- ``tau_min`` / ``tau_max`` of a conditional τ (0.05, 1.0) and of the dro mode (0.05, 0.7), in
  ``temperature`` and ``teacher_temperature``; a learnable or adaptive τ's None means unbounded and stays.

Left None: lengths "None = the whole run" (they depend on the run's step count, hence on the dataset size
under ``train.max_steps``), and what depends on the environment or the clock (``wandb.project``, the
default run name).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

from simclr_tau.config.validate import CONDITIONAL_TAU_MAX, CONDITIONAL_TAU_MIN, DRO_TAU_MAX, DRO_TAU_MIN

LARGE_IMAGE = 96  # side (px) from which the ImageNet/STL-10 augmentation defaults apply

# The side (px) of each dataset's images as stored; imagefolder images are resized to it.
NATIVE_IMAGE_SIZE = {"fashion_mnist": 28, "cifar10": 32, "cifar100": 32, "stl10": 96, "imagefolder": 224}


def native_image_size(data: Any) -> Optional[int]:
    """The native side of ``data`` (a DataConfig), or None when only the images can tell (a mixture)."""
    if data.name == "synthetic":
        return int(data.synthetic_image_size)
    return NATIVE_IMAGE_SIZE.get(data.name)


def augment_size_defaults(image_size: int) -> Dict[str, float]:
    """The image-size-aware augmentation defaults: a 0.08 crop of a 28 px image is 8 px, and blur destroys
    28-32 px images, so small images get crop_scale_min 0.2 and no blur (SimCLR's CIFAR setting)."""
    large = image_size >= LARGE_IMAGE
    return {"crop_scale_min": 0.08 if large else 0.2, "blur_p": 0.5 if large else 0.0}


def tau_bounds(t: Any) -> Tuple[Optional[float], Optional[float]]:
    """(tau_min, tau_max) of a TemperatureConfig with its mode's defaults: conditional (0.05, 1.0), dro
    (0.05, 0.7); other modes as given (None: unbounded)."""
    if t.mode == "conditional":
        lo, hi = CONDITIONAL_TAU_MIN, CONDITIONAL_TAU_MAX
    elif t.mode == "dro":
        lo, hi = DRO_TAU_MIN, DRO_TAU_MAX
    else:
        return t.tau_min, t.tau_max
    return (t.tau_min if t.tau_min is not None else lo), (t.tau_max if t.tau_max is not None else hi)


def resolve_defaults(cfg: Any, image_size: Optional[int] = None) -> Any:
    """A copy of ``cfg`` (a Config or DistillConfig DictConfig) with the run-time defaults filled in (see the
    module docstring). ``image_size``: the side the run resolved from its data (used when
    ``data.image_size`` is None; without it, the dataset's native side where the name tells it)."""
    out = copy.deepcopy(cfg)
    size = cfg.data.image_size or image_size or native_image_size(cfg.data)
    if size is not None:
        out.data.image_size = int(size)
        for key, value in augment_size_defaults(int(size)).items():
            if out.augment[key] is None:
                out.augment[key] = value
    for name in ("temperature", "teacher_temperature"):
        if name in out:
            out[name].tau_min, out[name].tau_max = tau_bounds(out[name])
    return out
