"""Patch masks shared by the masked-image-modelling objectives."""

from __future__ import annotations

import math
import random
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


def multi_block_mask(
    grid: tuple[int, int],
    num_masked: int,
    rng: random.Random,
    min_block: int = 4,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    attempts: int = 10,
) -> Tensor:
    """BEiT's and DINOv2's ``MaskingGenerator``: rectangles of ``min_block`` to ``max_block``
    (default half the grid) patches with a log-uniform aspect ratio in (min_aspect,
    1/min_aspect), placed uniformly, until about ``num_masked`` patches are covered; (h, w) bool.
    Each rectangle may overlap earlier ones but must add at least one patch and not overshoot, so
    the count never exceeds ``num_masked`` and falls short only when no rectangle fits in
    ``attempts`` tries."""
    h, w = grid
    max_block = max_block if max_block is not None else h * w // 2
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    mask = torch.zeros(h, w, dtype=torch.bool)
    count = 0
    while count < num_masked:
        most = min(num_masked - count, max_block)
        added = 0
        for _ in range(attempts):
            area = rng.uniform(min_block, most)
            aspect = math.exp(rng.uniform(*log_aspect))
            bh, bw = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if bw < w and bh < h:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                block = mask[top : top + bh, left : left + bw]
                new = bh * bw - int(block.sum())
                if 0 < new <= most:
                    block.fill_(True)
                    added = new
            if added:
                break
        if not added:
            break
        count += added
    return mask


def ibot_masks(
    num_crops: int,
    grid: tuple[int, int],
    rng: random.Random,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
) -> Tensor:
    """DINOv2's masks for a batch of global crops (``collate_data_and_cast``): ``int(num_crops x
    mask_probability)`` of them get a :func:`multi_block_mask`, the i-th of those a ratio drawn
    uniformly from the i-th of equal slices of ``ratio_range`` (so the batch spans the range), the
    rest none; which crops are masked is shuffled. (num_crops, h*w) bool."""
    n = grid[0] * grid[1]
    num_masked_crops = int(num_crops * mask_probability)
    lo, hi = ratio_range
    edges = [lo + (hi - lo) * i / max(num_masked_crops, 1) for i in range(num_masked_crops + 1)]
    masks = [
        multi_block_mask(grid, int(n * rng.uniform(edges[i], edges[i + 1])), rng).flatten()
        for i in range(num_masked_crops)
    ]
    masks += [torch.zeros(n, dtype=torch.bool)] * (num_crops - num_masked_crops)
    rng.shuffle(masks)
    return torch.stack(masks)
