"""Per-step schedules (learning rate, weight decay, EMA momentum) as pure functions of the step,
so a resumed run recomputes them from the restored global step."""

from __future__ import annotations

import math


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, peak: float, final: float, start: float = 0.0
) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then half-cosine to ``final``
    at ``total_steps`` (MAE's per-iteration ``adjust_learning_rate``; SimMIM warms up from its
    ``WARMUP_LR``)."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_to(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps`` (DINO's teacher momentum
    0.996 -> 1 and weight decay 0.04 -> 0.4, MoCo v3's momentum 0.99 -> 1)."""
    return warmup_cosine(step, total_steps, 0, start, end)


def linear_warmup_then_constant(epoch: int, warmup_epochs: int, start: float, end: float) -> float:
    """DINO's teacher temperature: ``np.linspace(start, end, warmup_epochs)`` for the first epochs,
    then ``end``."""
    if epoch >= warmup_epochs:
        return end
    return start + (end - start) * epoch / max(1, warmup_epochs - 1)
