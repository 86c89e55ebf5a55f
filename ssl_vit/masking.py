"""Patch masks shared by the masked-image-modelling objectives."""

from __future__ import annotations

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
