"""Cross-rank collectives the objectives need, written once; identity when not distributed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, gradients flowing back to each rank's own
    part (the backward all-reduces them), as SimCLR's cross-rank negatives need."""
    if world()[1] == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0, without gradients (MoCo v3's keys)."""
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def mean_over_ranks(x: Tensor) -> Tensor:
    """The mean of ``x`` across ranks (DINO's centre: batch means of equal-sized batches)."""
    _, size = world()
    if size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / size
