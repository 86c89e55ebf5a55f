"""Patch masks shared by the masked-image-modelling objectives."""

from __future__ import annotations

import math
import random
from typing import NamedTuple

import torch
from torch import Tensor

from ssl_vit.errors import UserError


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


class ContextTargetMasks(NamedTuple):
    context_idx: Tensor  # (B, Kc) patch indices the context encoder sees, ascending
    target_idx: Tensor  # (T, B, Kt) patch indices of each of the T target blocks, ascending


def ijepa_block_size(
    u: float, grid: tuple[int, int], scale: tuple[float, float], aspect_ratio: tuple[float, float]
) -> tuple[int, int]:
    """I-JEPA's ``_sample_block_size``: one uniform draw ``u`` sets both the block's area fraction
    and its aspect ratio (height / width) within their ranges; the block is at most one patch
    smaller than the grid on each side."""
    h_grid, w_grid = grid
    area = int(h_grid * w_grid * (scale[0] + u * (scale[1] - scale[0])))
    aspect = aspect_ratio[0] + u * (aspect_ratio[1] - aspect_ratio[0])
    h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    return min(h, h_grid - 1), min(w, w_grid - 1)


def check_ijepa_block_sizes(
    grid: tuple[int, int],
    target_scale: tuple[float, float],
    target_aspect_ratio: tuple[float, float],
    context_scale: tuple[float, float],
    min_keep: int,
) -> None:
    """Fail unless every block size a draw can give has more than ``min_keep`` patches: the
    official collator redraws smaller blocks for ever."""
    for what, scale, aspect in (
        ("target", target_scale, target_aspect_ratio),
        ("context", context_scale, (1.0, 1.0)),
    ):
        smallest = min((ijepa_block_size(i / 100, grid, scale, aspect) for i in range(101)), key=lambda s: s[0] * s[1])
        _check_min_keep(what, smallest, grid, min_keep)


def _check_min_keep(what: str, size: tuple[int, int], grid: tuple[int, int], min_keep: int) -> None:
    if size[0] * size[1] <= min_keep:
        raise UserError(
            f"I-JEPA {what} blocks can be {size[0]}x{size[1]} patches on the {grid[0]}x{grid[1]} grid, not more than "
            f"model.min_keep={min_keep}; lower min_keep or raise the {what} block scale"
        )


def _blocks(top: Tensor, left: Tensor, size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """(...) corners -> (..., h, w) bool masks of ``size`` rectangles there."""
    rows = torch.arange(grid[0], device=top.device)
    cols = torch.arange(grid[1], device=top.device)
    in_rows = (rows >= top[..., None]) & (rows < top[..., None] + size[0])
    in_cols = (cols >= left[..., None]) & (cols < left[..., None] + size[1])
    return in_rows[..., :, None] & in_cols[..., None, :]


def _random_corners(
    shape: tuple[int, ...], size: tuple[int, int], grid: tuple[int, int], device
) -> tuple[Tensor, Tensor]:
    # torch.randint(0, H - h): as the official collator, a block never touches the last row or column
    top = torch.randint(0, grid[0] - size[0], shape, device=device)
    left = torch.randint(0, grid[1] - size[1], shape, device=device)
    return top, left


def _first_true_indices(masks: Tensor, count: int) -> Tensor:
    """(B, N) bool with at least ``count`` True per row -> (B, count) indices of the first ones."""
    return torch.argsort((~masks).to(torch.uint8), dim=1, stable=True)[:, :count]


def ijepa_multiblock_masks(
    batch_size: int,
    grid: tuple[int, int],
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_keep: int = 10,
    allow_overlap: bool = False,
    device: torch.device | str | None = None,
    timeout: int = 20,
) -> ContextTargetMasks:
    """I-JEPA's multi-block masks (``src/masks/multiblock.py``), for one batch.

    One target block size and one context block size (aspect 1) are drawn for the whole batch
    (:func:`ijepa_block_size`); every sample places its ``num_targets`` target blocks and its
    context block at its own uniformly drawn positions. The context keeps only its patches
    outside every target block (unless ``allow_overlap``), and is redrawn until more than
    ``min_keep`` patches remain; after ``timeout`` failed draws a sample drops the constraint of
    its last target block, then of the one before, and so on, as the official collator does. All
    samples then keep the context size of the smallest one (their lowest-index patches), so the
    batch stacks; target blocks are all the same size already.
    """
    h, w = grid
    target_size = ijepa_block_size(torch.rand(1).item(), grid, target_scale, target_aspect_ratio)
    context_size = ijepa_block_size(torch.rand(1).item(), grid, context_scale, (1.0, 1.0))
    # This draw's sizes only (IJEPA checks every size a draw can give once, at construction):
    # a context that can never keep more than min_keep patches would be redrawn for ever.
    _check_min_keep("target", target_size, grid, min_keep)
    _check_min_keep("context", context_size, grid, min_keep)
    top, left = _random_corners((batch_size, num_targets), target_size, grid, device)
    targets = _blocks(top, left, target_size, grid)  # (B, T, h, w)
    target_idx = torch.stack(
        [_first_true_indices(t.flatten(1), target_size[0] * target_size[1]) for t in targets.unbind(1)]
    )

    context = torch.zeros(batch_size, h, w, dtype=torch.bool, device=device)
    found = torch.zeros(batch_size, dtype=torch.bool, device=device)
    dropped = torch.zeros(batch_size, dtype=torch.long, device=device)  # target constraints given up
    failures = torch.zeros(batch_size, dtype=torch.long, device=device)
    kept_targets = torch.arange(num_targets, device=device)
    while not bool(found.all()):
        block = _blocks(*_random_corners((batch_size,), context_size, grid, device), context_size, grid)
        if not allow_overlap:
            constraining = kept_targets < (num_targets - dropped)[:, None]  # (B, T)
            block &= ~(targets & constraining[:, :, None, None]).any(dim=1)
        ok = block.flatten(1).sum(dim=1) > min_keep
        context[ok & ~found] = block[ok & ~found]
        failed = ~ok & ~found
        failures += failed.long()
        expired = failed & (failures == timeout)
        dropped += expired.long()
        failures[expired] = 0
        found |= ok
    context = context.flatten(1)
    return ContextTargetMasks(_first_true_indices(context, int(context.sum(dim=1).min())), target_idx)
