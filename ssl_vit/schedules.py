"""Per-step schedules (learning rate, weight decay, EMA momentum) as pure functions of the step,
so a resumed run recomputes them from the restored global step."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then half-cosine to ``final`` at
    ``total_steps`` (MAE's per-iteration ``adjust_learning_rate``)."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
