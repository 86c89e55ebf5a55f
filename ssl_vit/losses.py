"""Objective losses, written once and reused by any method that needs them."""

from __future__ import annotations

from torch import Tensor


def normalized_patch_targets(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """MAE's ``norm_pix_loss`` target: each patch minus its mean over its pixels, divided by
    sqrt(unbiased variance + eps)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_patch_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """MAE's loss: per-patch mean squared error, averaged over masked patches only.

    pred, target: (B, N, P); mask: (B, N), 1 = masked.
    """
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
