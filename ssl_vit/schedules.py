"""Per-step schedules (learning rate, weight decay, EMA momentum) as pure functions of the step,
so a resumed run recomputes them from the restored global step."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple


class PaperRun(NamedTuple):
    """The run an objective's paper set its schedule lengths and EMA momentum for: its length in
    epochs and its optimiser steps per epoch (ImageNet-1k's 1,281,167 images / its global batch)."""

    epochs: float
    steps_per_epoch: float


#: The EMA rule's bounds, in optimiser steps: a teacher that averages over fewer steps is close to
#: a copy of the student, which DINO's ablation (Table 6: "previous iter") shows collapses; one that
#: averages over more than 5% of the run keeps more than e^-3 of its random start past the first 15%.
EMA_MIN_WINDOW_STEPS = 10
EMA_MAX_WINDOW_RUN_FRACTION = 0.05


def steps_per_epoch(trainer: Any) -> int:
    """A Lightning trainer's optimiser steps per epoch: an epoch's last, partial accumulation
    steps too."""
    return max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    peak: float,
    final: float,
    start: float = 0.0,
    warmup_shape: Literal["linear", "cosine"] = "linear",
) -> float:
    """Warm-up from ``start`` to ``peak`` over ``warmup_steps``, then half-cosine to ``final`` at
    ``total_steps`` (MAE's per-iteration ``adjust_learning_rate``; SimMIM warms up from its
    ``WARMUP_LR``). The warm-up is linear, or with ``warmup_shape: cosine`` a half-cosine rise
    (DINOv3's high-resolution stage: its ``CosineScheduler`` from 0 up to the lr)."""
    if step < warmup_steps:
        progress = step / warmup_steps
        if warmup_shape == "cosine":
            progress = (1.0 - math.cos(math.pi * progress)) / 2
        return start + (peak - start) * progress
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


def scaled_epochs(paper_epochs: float, run_epochs: float, paper: PaperRun) -> float:
    """A schedule length set in epochs for the paper's run (a warm-up), shrunk in proportion for a
    shorter run and kept as it is for a longer one: a 10-epoch warm-up of a 100-epoch run is 0.8
    epochs of an 8-epoch run, and still 10 epochs of an 800-epoch one."""
    return paper_epochs * min(1.0, run_epochs / paper.epochs)


def scaled_ema_momentum(paper_momentum: float, steps_per_epoch: float, total_steps: int, paper: PaperRun) -> float:
    """An EMA momentum set for the paper's steps per epoch, for a run with ``steps_per_epoch``: the
    EMA scaling rule (Busbridge et al., 2023), ``m ** (paper steps per epoch / run steps per
    epoch)``, keeps the teacher's averaging window the same fraction of an epoch (DINO's 0.996 at
    batch 1024: 250 steps, a fifth of an ImageNet epoch) whatever the batch and dataset size. The
    window 1 / (1 - m) is then kept between ``EMA_MIN_WINDOW_STEPS`` and
    ``EMA_MAX_WINDOW_RUN_FRACTION`` of the run; at the paper's scale neither bound applies and the
    paper's momentum comes back unchanged."""
    momentum = paper_momentum ** (paper.steps_per_epoch / steps_per_epoch)
    window = 1.0 / max(1.0 - momentum, 1e-12)
    bounded = max(EMA_MIN_WINDOW_STEPS, min(window, EMA_MAX_WINDOW_RUN_FRACTION * total_steps))
    return momentum if bounded == window else 1.0 - 1.0 / bounded
