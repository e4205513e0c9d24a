"""The few torch.distributed helpers the losses and the MoCo queue need.

Everything degrades to the identity when torch.distributed is not initialized, so the same code runs
on one CPU process, one GPU or many.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> Tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (same shape on every rank) over ranks in rank order, keeping gradients.

    ``torch.distributed.nn.functional.all_gather`` is differentiable: its backward sums the incoming
    gradients over ranks and returns each rank its slice, so a loss on rank r that uses another rank's
    samples as negatives sends gradient to that rank. (Accelerate's ``gather`` and plain
    ``dist.all_gather`` return tensors without a gradient: the bug behind lightly#1528 and friends.)
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` over ranks in rank order, without gradient (MoCo keys and queue updates)."""
    if not is_distributed():
        return x
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)
