"""Cross-rank collectives the objectives need, written once (identity when not distributed),
the FSDP strategy for encoders too large for DDP, and what rank 0 alone may ask of a run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import CustomPolicy


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
    return sum_over_ranks(x) / world()[1]


@torch.no_grad()
def sum_over_ranks(x: Tensor) -> Tensor:
    """The sum of ``x`` across ranks (Sinkhorn-Knopp's global-batch normalisers)."""
    return _all_reduce(x, dist.ReduceOp.SUM)


@torch.no_grad()
def max_over_ranks(x: Tensor) -> Tensor:
    return _all_reduce(x, dist.ReduceOp.MAX)


def _all_reduce(x: Tensor, op: Any) -> Tensor:
    if world()[1] == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=op)
    return x


class BlockFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP with the wrapping ViT pretraining needs: every transformer block is its own
    FSDP unit (its weights gathered just before it runs, freed after), and so is every part of the
    objective (encoder, EMA teacher, heads, decoder). The parts matter for the EMA objectives: a
    teacher and its student then have the same flat-parameter layout, so each rank's shard of the
    teacher lines up with its shard of the student and the EMA update stays element-wise.

    ``activation_checkpointing`` recomputes each block's activations in the backward pass.
    Any other argument is Lightning's ``FSDPStrategy``'s (``sharding_strategy``, ``cpu_offload``...).
    In a recipe: ``trainer.strategy: {class_path: ssl_vit.distributed.BlockFSDPStrategy}``.
    """

    def __init__(self, activation_checkpointing: bool = False, **kwargs: Any) -> None:
        super().__init__(activation_checkpointing_policy={Block} if activation_checkpointing else None, **kwargs)

    def setup(self, trainer: L.Trainer) -> None:
        self.kwargs["auto_wrap_policy"] = fsdp_wrap_policy(self.lightning_module)
        super().setup(trainer)


def fsdp_wrap_policy(objective: nn.Module) -> CustomPolicy:
    """FSDP units: every transformer block, and every direct part of ``objective``."""
    parts = set(objective.children())
    return CustomPolicy(lambda module: isinstance(module, Block) or module in parts)


def gradient_shard_group(trainer: L.Trainer | None) -> dist.ProcessGroup | None:
    """The process group across which each rank holds a shard of every gradient (FSDP's, unless
    it keeps whole gradients), else None: with DDP every rank holds the whole averaged gradient."""
    model = trainer.strategy.model if trainer is not None and isinstance(trainer.strategy, FSDPStrategy) else None
    if not isinstance(model, FSDP) or model.sharding_strategy == ShardingStrategy.NO_SHARD:
        return None
    return model.process_group


@torch.no_grad()
def clip_grad_norms_(
    groups: Iterable[Iterable[nn.Parameter]], max_norm: float, shard_group: dist.ProcessGroup | None = None
) -> None:
    """Scale each group's gradients so that their L2 norm is at most ``max_norm``, each group on its
    own, by torch's ``clip_grad_norm_`` rule (x max_norm / (norm + 1e-6) when above). One group per
    parameter is DINO's clipping, one per module DINOv2's, one for everything SimMIM's. With a
    ``shard_group`` (FSDP) each rank holds a shard of every gradient: the squared norms are summed
    across it first (one all-reduce), so every rank scales by the whole gradient's norm, as FSDP's
    own ``clip_grad_norm_`` and the official DINOv2 code do."""
    groups = [list(group) for group in groups]
    # The device from the parameters, not their gradients: a rank whose shards hold no gradient
    # still joins the all-reduce.
    device = next((p.device for group in groups for p in group), None)
    if device is None:
        return
    grads = [[p.grad for p in group if p.grad is not None] for group in groups]
    squares = torch.stack(
        [sum((g.float().square().sum() for g in group), torch.zeros((), device=device)) for group in grads]
    )
    if shard_group is not None:
        dist.all_reduce(squares, group=shard_group)
    scales = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for group, scale in zip(grads, scales, strict=True):
        for g in group:
            g.mul_(scale)


def log_folder(trainer: L.Trainer) -> str:
    """``trainer.log_dir`` without its broadcast, which every rank must join: the end-of-run
    summary and records are written by rank 0 alone, when the other ranks may have ended."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None:
        return str(trainer.default_root_dir)
    return str(logger.log_dir if isinstance(logger, TensorBoardLogger | CSVLogger) else logger.save_dir)
