"""The dataset interface every source implements: ``(uint8 image C x H x W, int label)`` plus metadata,
and its in-memory form (one uint8 tensor), which the batched on-device augmentation trains from."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    """Base: ``__getitem__(i) -> (uint8 C x H x W tensor, label)`` plus metadata.

    Attributes: ``channels``, ``image_size`` (native side), ``num_classes``, ``classes``, ``labels``
    (long tensor), ``images`` (uint8 (N, C, H, W) tensor, or None for on-disk datasets).
    """

    images: Optional[Tensor] = None
    labels: Tensor
    channels: int
    image_size: int
    classes: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class TensorImageDataset(ImageDataset):
    """An in-memory dataset of uint8 images (N, C, H, W) and labels (N,)."""

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W); got {images.dtype} {tuple(images.shape)}")
        self.images = images.contiguous()
        self.labels = labels.long()
        self.channels = int(images.shape[1])
        self.image_size = int(images.shape[-1])
        self.classes = list(classes)

    def __getitem__(self, i: int) -> Tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])
