"""Images <-> sequences of flattened patches, in MAE's (row, column, channel) pixel order."""

from __future__ import annotations

import torch
from torch import Tensor


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, grid_size: tuple[int, int]) -> Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p), the inverse of :func:`patchify`."""
    b, _, d = patches.shape
    p, (h, w) = patch_size, grid_size
    c = d // (p * p)
    x = patches.reshape(b, h, w, p, p, c)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, h * p, w * p)
