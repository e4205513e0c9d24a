"""From a dataset to two augmented views per sample, reproducibly.

Every random choice of the data path is a pure function of ``(seed, epoch, sample index)``: the sampler
yields ``(epoch, index)`` keys, and :class:`TwoViewDataset` seeds the augmentation RNG from the key. So a
run gives the same views whatever the number of processes or workers, and a resumed run (mid-epoch
included) sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Callable, Iterator, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from simclr_tau.data.datasets import ImageDataset


def mix_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed from a few integers, e.g. (seed, epoch, sample) (SeedSequence hashing)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class EpochSampler(Sampler[Tuple[int, int]]):
    """A seeded random permutation per epoch, yielding ``(epoch, index)`` keys.

    Call :meth:`set_epoch` before each epoch (the permutation depends only on ``seed`` and the epoch).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = range(self.n)
        return ((self.epoch, i) for i in order)

    def __len__(self) -> int:
        return self.n


class TwoViewDataset(Dataset):
    """``dataset[(epoch, i)] -> (view1, view2, label)``, the views drawn with an RNG seeded by the key."""

    def __init__(self, base: ImageDataset, view: Callable[[Tensor], Tensor], seed: int) -> None:
        self.base, self.view, self.seed = base, view, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[Tensor, Tensor, int]:
        epoch, i = key
        x, y = self.base[i]
        # torchvision's v2 transforms draw from the global RNG: seed it per sample (the worker's
        # own stream is irrelevant then, which is what makes the views process-layout-independent).
        torch.manual_seed(mix_seed(self.seed, epoch, i))
        return self.view(x), self.view(x), y
