"""Patch masks shared by the masked-image-modelling objectives."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class PatchMask(NamedTuple):
    keep_idx: Tensor  # (B, K) indices of visible patches, in shuffled order
    restore_idx: Tensor  # (B, N) inverse permutation: puts [visible, masked] back in patch order
    mask: Tensor  # (B, N) float, 1 = masked, 0 = visible, in patch order


def random_patch_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> PatchMask:
    """MAE's per-sample random mask: shuffle patches by uniform noise and keep the first
    ``int(N * (1 - mask_ratio))``; every sample gets its own permutation."""
    num_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    shuffle_idx = noise.argsort(dim=1)
    restore_idx = shuffle_idx.argsort(dim=1)
    mask = torch.ones(batch_size, num_patches, device=device)
    mask[:, :num_keep] = 0
    return PatchMask(shuffle_idx[:, :num_keep], restore_idx, torch.gather(mask, 1, restore_idx))


def block_patch_mask(
    batch_size: int,
    grid_size: tuple[int, int],
    patch_size: int,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    device: torch.device | str | None = None,
) -> Tensor:
    """SimMIM's mask: a random ``ceil(ratio x count)`` of the (mask_patch_size)-pixel blocks, each
    covering (mask_patch_size / patch_size)^2 model patches; (B, h, w) bool over the patch grid,
    one independent mask per sample."""
    scale = mask_patch_size // patch_size
    if scale < 1 or grid_size[0] % scale or grid_size[1] % scale:
        raise ValueError(
            f"mask_patch_size {mask_patch_size} must be a multiple of patch_size {patch_size} dividing the grid"
        )
    rows, cols = grid_size[0] // scale, grid_size[1] // scale
    count = rows * cols
    num_masked = math.ceil(count * mask_ratio)
    order = torch.rand(batch_size, count, device=device).argsort(dim=1)
    blocks = torch.zeros(batch_size, count, dtype=torch.bool, device=device)
    blocks.scatter_(1, order[:, :num_masked], True)
    blocks = blocks.view(batch_size, rows, cols)
    return blocks.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def patch_mask_to_pixels(mask: Tensor, patch_size: int) -> Tensor:
    """(B, h, w) patch mask -> (B, 1, h*p, w*p) pixel mask of the same dtype."""
    return mask.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2).unsqueeze(1)
