"""Stops a run whose loss or gradients turn abnormal, and keeps the last good state."""

from __future__ import annotations

import copy
import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ssl_vit.distributed import gradient_shard_group, mean_over_ranks
from ssl_vit.errors import UserError, counted

#: A restore point is taken only at a step whose loss and gradient norm are within this factor of
#: their recent medians (one order of magnitude): a blow-up that grows over several steps before it
#: crosses ``jump_factor`` leaves none of its steps as the "good" state, while normal spikes (at
#: most 13x in the runs measured) cost at most the odd restore point.
RESTORE_POINT_FACTOR = 10.0


class RecentMedian:
    """One quantity's (a loss's, a gradient norm's) last ``window`` values that were not
    abnormal, and how far a new value lies from their median magnitude."""

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)

    def median(self) -> float | None:
        """None before the first value, or when the values are all zero (no scale to judge by)."""
        median = statistics.median(abs(v) for v in self.values) if self.values else 0.0
        return median or None

    def times_median(self, value: float) -> float:
        """``|value|`` over the median; infinite for a non-finite value, 1 without a median."""
        if not math.isfinite(value):
            return math.inf
        median = self.median()
        return abs(value) / median if median is not None else 1.0

    def add(self, value: float) -> None:
        self.values.append(value)


@dataclass
class LoopPosition:
    """Where a run resumed at step ``step`` starts: the training loop's progress, the data
    loader's position in it, as a checkpoint saved between two steps holds them."""

    step: int
    epoch: int
    fit_loop: dict[str, Any]  # checkpoint["loops"]["fit_loop"]

    @classmethod
    def now(cls, trainer: L.Trainer) -> LoopPosition:
        return cls(trainer.global_step, trainer.current_epoch, copy.deepcopy(trainer.fit_loop.state_dict()))


@dataclass
class RestorePoint:
    """A copy of what a checkpoint holds that changes from step to step, as it was before one
    step's update: the parameters and buffers (teachers and centres included), the optimiser
    state and the loop position. (It is taken at the step's check, after its forward pass, so
    BatchNorm running statistics are one batch newer; RNG states are those of the stop.)"""

    position: LoopPosition
    state_dict: dict[str, Any]
    optimizer_states: list[dict[str, Any]]

    @classmethod
    def take(cls, trainer: L.Trainer, position: LoopPosition) -> RestorePoint:
        strategy = trainer.strategy
        optimizer_states = [_copied(strategy.optimizer_state(o)) for o in trainer.optimizers]
        return cls(position, _copied(strategy.lightning_module_state_dict()), optimizer_states)

    def write_into(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["epoch"], checkpoint["global_step"] = self.position.epoch, self.position.step
        checkpoint["state_dict"], checkpoint["optimizer_states"] = self.state_dict, self.optimizer_states
        checkpoint["loops"]["fit_loop"] = self.position.fit_loop


def _copied(state: Any) -> Any:
    """``state`` with every tensor copied (a state dict's tensors are the live ones), containers
    rebuilt as their own type (an ``OrderedDict`` keeps its ``_metadata``)."""
    if isinstance(state, Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        copied = copy.copy(state)
        for key, value in state.items():
            copied[key] = _copied(value)
        return copied
    if type(state) in (list, tuple):
        return type(state)(_copied(v) for v in state)
    return state


class NonFiniteGuard(L.Callback):
    """Checks each optimiser step's loss and gradient norm (one device sync per step).

    A step is *abnormal* when its loss or gradient norm is non-finite, or more than
    ``jump_factor`` times the median of the last ``window`` values that were not abnormal (from
    the second step on: the median of the steps there were). A learning rate far too high blows
    the parameters up some steps before anything is non-finite, and its loss jumps by many orders
    of magnitude (1e20-fold at the first step for a tiny MAE at base_lr 1e6). Normal training stays
    far below 1000x: in quickstart runs of every objective (1 to 3 epochs), no loss was more than
    1.1x, and no gradient norm more than 13x (SimMIM, one step), the median of the steps before it;
    the first steps, which warm-up keeps nearly still, were the calmest. A 50-step median ignores
    up to 24 spikes, and follows a lasting change of level (DINO's last layer joining the gradient
    after its first epoch) within 25 steps.

    The loss of step t comes from the parameters that the update of step t - 1 made, an update
    whose own loss and gradients looked normal, so the good state is one from before it: every
    ``snapshot_every`` steps, at a step within ``RESTORE_POINT_FACTOR`` of its medians, the guard
    copies the parameters, buffers, optimiser state and loop position. The copy is held in device
    memory: about 3x the trainable parameters' bytes with AdamW, 4x with an EMA teacher. Under
    FSDP each copy gathers the whole state as a checkpoint does, so raise ``snapshot_every``
    there. ``benchmarks/guard_overhead.py`` times it.

    ``action: stop`` (default): at the first abnormal step, save the newest copy as
    ``last-good-step=N.ckpt`` beside the run's checkpoints (the next run of the same command
    resumes from it, with that command's learning rate) and stop with a message naming the step,
    each abnormal value against its recent median, and the remedy. ``action: skip``: drop the
    abnormal step's update and go on, unless ``max_consecutive_skips`` steps in a row were dropped
    (then stop as above: the parameters themselves are broken, e.g. by the update before the first
    of them).
    """

    def __init__(
        self,
        action: Literal["stop", "skip"] = "stop",
        max_consecutive_skips: int = 10,
        jump_factor: float = 1000.0,
        window: int = 50,
        snapshot_every: int = 1,
    ) -> None:
        if jump_factor <= RESTORE_POINT_FACTOR:
            raise UserError(f"nonfinite.jump_factor is {jump_factor}; it must be above {RESTORE_POINT_FACTOR}")
        if window < 1 or snapshot_every < 1:
            raise UserError(f"nonfinite.window ({window}) and nonfinite.snapshot_every ({snapshot_every}) must be >= 1")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.jump_factor = jump_factor
        self.snapshot_every = snapshot_every
        self.history = {"loss": RecentMedian(window), "gradient norm": RecentMedian(window)}
        self.skipped_in_a_row = 0
        self.restore_point: RestorePoint | None = None
        self._next_step_start: LoopPosition | None = None  # recorded when a step ends, for the next one
        self._saving: RestorePoint | None = None  # the restore point the checkpoint being saved holds
        self._loss_sum: Tensor | None = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "loops" in checkpoint:  # a resumed run starts where its checkpoint says
            fit_loop = copy.deepcopy(checkpoint["loops"]["fit_loop"])
            self._next_step_start = LoopPosition(checkpoint["global_step"], checkpoint["epoch"], fit_loop)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._next_step_start is None:  # a fresh run: no progress yet, the loader at its start
            self._next_step_start = LoopPosition.now(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # The loop position a checkpoint saved now would resume from, the one Lightning's own
        # checkpoints between steps hold; during the step, the loader already counts its batch
        # as read. Once per optimiser step (the last of its micro-batches), when a restore point
        # may be taken at the next one.
        step = trainer.global_step
        stepped = self._next_step_start is None or self._next_step_start.step != step
        if stepped and self.restore_point_due(step):
            self._next_step_start = LoopPosition.now(trainer)

    def restore_point_due(self, step: int) -> bool:
        return self.restore_point is None or step >= self.restore_point.position.step + self.snapshot_every

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        # Summed over gradient accumulation's micro-batches (each loss is already divided by their number).
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        values = self.step_values(trainer, optimizer)
        abnormal, trusted = self.judge(values)
        step = trainer.global_step
        if not abnormal:
            self.skipped_in_a_row = 0
            position = self._next_step_start
            if trusted and position is not None and position.step == step and self.restore_point_due(step):
                self.restore_point = RestorePoint.take(trainer, position)
            return
        first = abnormal[0]
        kind = "abnormal" if math.isfinite(values[first]) else "non-finite"
        where = f"{kind} {first} at step {step} of {type(pl_module).__name__}"
        details = self.describe(abnormal, values)
        if self.action == "skip" and self.skipped_in_a_row < self.max_consecutive_skips:
            self.skipped_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
            rank_zero_warn(f"{where}: step skipped (nonfinite.action: skip; {details})")
            return
        path, saved_step = self.save_last_good(trainer)
        repeated = f", {self.skipped_in_a_row} steps in a row were skipped before it" if self.skipped_in_a_row else ""
        raise UserError(
            f"{where} ({details}{repeated}); saved the last good state (step {saved_step}) to {path}. "
            "Lower model.init_args.base_lr or check the data, then run the same command to resume from it "
            "(or set nonfinite.action: skip)"
        )

    def judge(self, values: dict[str, float]) -> tuple[list[str], bool]:
        """The names of one step's abnormal values, and whether the step may be a restore point
        (every value within ``RESTORE_POINT_FACTOR`` of its median). The values of a step that
        is not abnormal join the history."""
        ratios = {name: self.history[name].times_median(value) for name, value in values.items()}
        abnormal = [name for name, ratio in ratios.items() if ratio > self.jump_factor]
        if not abnormal:
            for name, value in values.items():
                self.history[name].add(value)
        return abnormal, max(ratios.values(), default=1.0) <= RESTORE_POINT_FACTOR

    def step_values(self, trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The step's loss (averaged over ranks) and gradient norm (of the whole gradient, under
        FSDP too): the same numbers on every rank, so that every rank decides alike."""
        values: dict[str, Tensor] = {}
        if self._loss_sum is not None:
            values["loss"] = mean_over_ranks(self._loss_sum)
            self._loss_sum = None
        # Under fp16 the grad scaler already skips steps with inf gradients, and the scaled norm
        # moves with the scale: only the loss is ours to check.
        if trainer.precision != "16-mixed":
            params = [p for group in optimizer.param_groups for p in group["params"]]
            grads = [p.grad for p in params if p.grad is not None]
            # On the parameters' device even without gradients: under FSDP every rank joins the all-reduce.
            squared = torch.nn.utils.get_total_norm(grads).to(params[0].device, torch.float32).square()
            shard_group = gradient_shard_group(trainer)
            if shard_group is not None:  # each rank holds a shard of every gradient
                dist.all_reduce(squared, group=shard_group)
            values["gradient norm"] = squared.sqrt()
        if not values:
            return {}
        device = next(iter(values.values())).device
        numbers = torch.stack([v.float().to(device) for v in values.values()]).tolist()  # the one sync
        return dict(zip(values, numbers, strict=True))

    def describe(self, abnormal: list[str], values: dict[str, float]) -> str:
        """Each abnormal value, against its recent median when it is finite."""
        details = []
        for name in abnormal:
            value, history = values[name], self.history[name]
            if math.isfinite(value):
                median = history.median()
                details.append(
                    f"{name} {value:.3g}, {abs(value) / median:.3g} times the median {median:.3g} of the last "
                    f"{len(history.values)} normal steps; more than {self.jump_factor:g} times is abnormal"
                )
            else:
                details.append(f"{name} {value}")
        return "; ".join(details)

    def save_last_good(self, trainer: L.Trainer) -> tuple[Path, int]:
        """Save the restore point as ``last-good-step=N.ckpt``; return its path and step."""
        ckpt = trainer.checkpoint_callback
        folder = Path(ckpt.dirpath if ckpt is not None and ckpt.dirpath else trainer.default_root_dir)
        # Without a restore point no step of this run was normal, so no update was made: the state
        # as it is now is the one the run started from.
        point = self.restore_point or RestorePoint.take(trainer, self._next_step_start)
        path = folder / f"last-good-step={point.position.step:08d}.ckpt"
        self._saving = point
        try:
            trainer.save_checkpoint(path, weights_only=False)
        finally:
            self._saving = None
        return path, point.position.step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._saving is not None:  # the last-good checkpoint: the restore point's state, not the current one
            self._saving.write_into(checkpoint)

    def state_dict(self) -> dict[str, Any]:
        # The recent values, so that a resumed run judges its first steps against them.
        return {name: list(history.values) for name, history in self.history.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, values in state_dict.items():
            self.history[name].values.extend(values)


#: What a collapse warning advises at step 0, before any update: no setting has acted yet.
BEFORE_ANY_UPDATE = "Before any update: the model as initialised; the next checks say whether training spreads it."


def collapse_warning_advice(
    step: int, since: int, total: int, uniform: bool, init_from: str | None, objective_advice: str
) -> str:
    """What a collapse warning at ``step`` of ``total``, of a collapse that began at ``since``,
    advises. Before any update no setting has acted yet, nor has one when a teacher went uniform
    within the run's first tenth (and stays so): the cause is the weights it starts from, or the
    data as a freshly initialised encoder sees it. Otherwise, the objective's ``objective_advice``."""
    if step == 0 and init_from:
        return (
            f"Before any update: the weights it starts from ({init_from}) do this already; a run that ended so "
            "passes it on."
        )
    if uniform and since <= total // 10:
        when = "Before any update" if step == 0 else f"Uniform since step {since}, within the run's first tenth"
        return (
            f"{when}: the freshly initialised encoder tells these images little apart (small grey images do this "
            "most), and this objective only sharpens what its teacher tells apart, as DINO's own code does; the "
            "encoder may still gain (the run's k-NN says), and objectives with negatives (SimCLR, MoCo v3) or pixel "
            "targets (MAE) learn from such a start in short runs."
        )
    return BEFORE_ANY_UPDATE if step == 0 else objective_advice


class CollapseWatch:
    """Counts the steps a run's outputs stay collapsed (spread below ``threshold``, or another
    sign the objective checks) and says when to warn: at the onset, and again every
    ``repeat_every`` steps for as long as it lasts, so a run that stays collapsed keeps saying
    so. Its state goes into checkpoints.

    The steps between two checks count only when both found the outputs collapsed; a check that
    finds a collapse after a healthy one counts its own step. A collapse seen at one check
    between healthy ones may have lasted one step or all the steps between them (the checks can
    be far apart), so it is not counted as if it had lasted."""

    def __init__(self, threshold: float = 0.05, before_training: int | None = None) -> None:
        self.threshold = threshold
        self.before_training = before_training  # a check at this step sees the model before any step: counts none
        self.collapsed_steps = 0  # steps spent collapsed, counted between checks that both saw it
        self.since: int | None = None  # the step the current collapse began
        self.last_check: int | None = None
        self.last_warning = 0

    def update(self, step: int, collapsed: bool, repeat_every: int) -> bool:
        """Record a check at ``step``; True when a warning is due."""
        elapsed = step - self.last_check if self.last_check is not None else 1
        self.last_check = step
        if not collapsed:
            self.since = None
            return False
        if self.since is None:
            self.collapsed_steps += step != self.before_training
            self.since = self.last_warning = step
            return True
        self.collapsed_steps += max(1, elapsed)
        if step - self.last_warning >= repeat_every:
            self.last_warning = step
            return True
        return False

    def state(self, step: int) -> str:
        """How a warning at ``step`` names the collapse: its onset, or how long it has lasted."""
        return "has collapsed" if self.since == step else f"is still collapsed (since step {self.since})"

    def warning(self, objective: str, step: int, spread: float, uniform: bool, advice: str) -> str:
        """The warning of a training-step check at ``step``: what collapsed (a uniform teacher, or
        the embeddings' ``spread``), for how long, and ``advice``."""
        what = (
            "its teacher's outputs are nearly uniform (entropy above ln K - ln 2: every image spread over more than "
            "half the outputs)"
            if uniform
            else f"the embeddings' spread (per-dimension std x sqrt(dim)) is {spread:.4f} < {self.threshold}; every "
            "image maps to nearly the same output"
        )
        so_far = counted(self.collapsed_steps, "step")
        return f"{objective} {self.state(step)} at step {step}, {so_far} collapsed so far: {what}. {advice}"

    def state_dict(self) -> dict[str, int | None]:
        return {k: getattr(self, k) for k in ("collapsed_steps", "since", "last_check", "last_warning")}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
