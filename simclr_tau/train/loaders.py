"""Data loaders of the training loop: each yields, per optimizer step, a list of ``grad_accum`` micro-batches
``(x1, x2, index)`` (this process's slice of the global micro-batch: two augmented views and the images'
dataset indices, which per-sample τ state is keyed by).

Rank r takes the r-th slice of every global micro-batch cut from the epoch's permutation, so the global
batch is the same for any number of processes (we shard by hand rather than with
``accelerator.prepare(loader)`` to guarantee that, and to resume mid-epoch by construction).
"""

from __future__ import annotations

from typing import Any, Iterator, List, Tuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from simclr_tau.data.augment import simclr_view_transform
from simclr_tau.data.batch_augment import BatchAugment
from simclr_tau.data.datasets import ImageDataset
from simclr_tau.data.pipeline import EpochSampler, TwoViewDataset, mix_seed
from simclr_tau.errors import UserError
from simclr_tau.train.signals import IgnoreStopSignals, stop_signals_blocked

Step = List[Tuple[Tensor, Tensor, Tensor]]


def global_micro_batch(tc: Any, dataset_size: int, world: int) -> int:
    """The global micro-batch ``batch_size / grad_accum``, checked against the data and the processes."""
    micro = tc.batch_size // tc.grad_accum
    if tc.batch_size > dataset_size:
        raise UserError(f"train.batch_size={tc.batch_size} is larger than the dataset ({dataset_size} images)")
    if micro % world:
        raise UserError(f"train.batch_size / train.grad_accum = {micro} must be divisible by the {world} processes")
    if micro // world < 2:
        raise UserError(f"{world} processes leave {micro // world} sample(s) each per micro-batch of {micro} (need 2): "
                        f"raise train.batch_size to at least {2 * world * tc.grad_accum} (the dataset has "
                        f"{dataset_size} images) or launch fewer processes")
    return micro


def build_loader(cfg: Any, dataset: ImageDataset, image_size: int, mean: List[float], std: List[float],
                 sampler: EpochSampler, micro: int, world: int, rank: int, device: torch.device) -> Any:
    """The ``data.pipeline`` loader: batched on the device for in-memory data (auto), else DataLoader workers."""
    pipeline = cfg.data.pipeline
    if pipeline == "auto":
        pipeline = "batched" if dataset.images is not None else "dataloader"
    if pipeline == "batched":
        if dataset.images is None:
            raise UserError("data.pipeline=batched needs an in-memory dataset; use data.pipeline=dataloader for imagefolder")
        augment = BatchAugment(cfg.augment, image_size, dataset.channels, mean, std)
        return BatchedLoader(dataset.images, augment, sampler, micro, world, rank, cfg.train.seed, device)
    view = simclr_view_transform(cfg.augment, image_size, dataset.channels, mean, std)
    return ShardedLoader(TwoViewDataset(dataset, view, cfg.train.seed), sampler, micro, world, rank,
                         cfg.data.num_workers)


class ShardedLoader:
    """Per-sample torchvision views in DataLoader workers (ImageFolder, large data): this rank's slice of
    each global micro-batch, grouped ``accum`` micro-batches per optimizer step."""

    def __init__(self, dataset: TwoViewDataset, sampler: EpochSampler, micro: int, world: int, rank: int,
                 num_workers: int) -> None:
        self.dataset, self.sampler, self.micro, self.world, self.rank = dataset, sampler, micro, world, rank
        self.num_workers = num_workers

    def epoch(self, epoch: int, skip_steps: int, accum: int) -> Iterator[Step]:
        self.sampler.set_epoch(epoch)
        keys = list(iter(self.sampler))
        n_steps = len(keys) // self.micro // accum
        per = self.micro // self.world
        mine = []  # the r-th slice of each global micro-batch, from the first unfinished step on
        for b in range(skip_steps * accum, n_steps * accum):
            start = b * self.micro + self.rank * per
            mine.extend(keys[start:start + per])
        # the workers ignore SIGTERM / SIGINT sent to the process group: the main process stops the run
        loader = DataLoader(self.dataset, batch_size=per, sampler=mine, drop_last=True,
                            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=IgnoreStopSignals() if self.num_workers else None)
        index = torch.tensor([i for _, i in mine], dtype=torch.long)  # the loader keeps the order of `mine`
        with stop_signals_blocked():  # the workers start here
            batches = iter(loader)
        group, b = [], 0
        for x1, x2, _ in batches:
            group.append((x1, x2, index[b * per:(b + 1) * per]))
            b += 1
            if len(group) == accum:
                yield group
                group = []


class BatchedLoader:
    """The fast path for in-memory datasets: the uint8 images live on the training device and both views
    are augmented there in one vectorized call per view (no per-image Python work).

    Augmentation parameters are drawn for the whole *global* micro-batch from a generator seeded by
    ``(seed, epoch, micro-batch, view)`` and each rank keeps its slice, so the views (like the batches)
    do not depend on the number of processes, and a resumed run redraws exactly the same ones.
    """

    def __init__(self, images: torch.Tensor, augment: BatchAugment, sampler: EpochSampler, micro: int, world: int,
                 rank: int, seed: int, device: torch.device) -> None:
        self.images = images.to(device)
        self.augment = augment.to(device)
        self.sampler, self.micro, self.world, self.rank, self.seed, self.device = sampler, micro, world, rank, seed, device

    def epoch(self, epoch: int, skip_steps: int, accum: int) -> Iterator[Step]:
        self.sampler.set_epoch(epoch)
        order = torch.tensor([i for _, i in self.sampler], dtype=torch.long)
        n_steps = len(order) // self.micro // accum
        per = self.micro // self.world
        lo, hi = self.rank * per, (self.rank + 1) * per
        gen = torch.Generator(device=self.device)
        for s in range(skip_steps, n_steps):
            group = []
            for b in range(s * accum, (s + 1) * accum):
                index = order[b * self.micro + lo: b * self.micro + hi]
                x = self.images[index.to(self.device)]
                views = []
                for v in (0, 1):
                    gen.manual_seed(mix_seed(self.seed, epoch, 2 * b + v))
                    params = self.augment.sample_params(self.micro, gen, self.device, input_size=x.shape[-2:])
                    views.append(self.augment.apply(x, {k: t[lo:hi] for k, t in params.items()}))
                group.append((views[0], views[1], index))
            yield group
