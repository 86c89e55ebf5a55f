"""Stops a run at its first non-finite loss or gradient, without losing the last good state."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ssl_vit.errors import UserError


class NonFiniteGuard(L.Callback):
    """Checks each optimiser step's loss and gradients (one device sync per step).

    ``action: stop`` (default): at the first non-finite value, save the parameters as they were
    before that step (``last-good-step=N.ckpt`` beside the run's checkpoints, which the next run
    of the same command resumes from) and stop with a message naming the step and objective.
    ``action: skip``: drop that step's update and go on, unless ``max_consecutive_skips`` steps
    in a row were dropped (then stop as above: the run is not recovering).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_consecutive_skips: int = 10) -> None:
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_in_a_row = 0
        self._loss_finite: Tensor | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_finite = self._loss_finite if self._loss_finite is not None else torch.tensor(True)
        self._loss_finite = None
        # Under fp16 the grad scaler already skips steps with inf gradients; only the loss is ours to check.
        grads = [] if trainer.precision == "16-mixed" else _grads(optimizer)
        grads_finite = torch.nn.utils.get_total_norm(grads).isfinite() if grads else torch.tensor(True)
        loss_ok, grads_ok = torch.stack([loss_finite.cpu(), grads_finite.cpu()]).tolist()
        if loss_ok and grads_ok:
            self.skipped_in_a_row = 0
            return
        what = "loss" if not loss_ok else "gradient"
        where = f"non-finite {what} at step {trainer.global_step} of {type(pl_module).__name__}"
        if self.action == "skip" and self.skipped_in_a_row < self.max_consecutive_skips:
            self.skipped_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
            rank_zero_warn(f"{where}: step skipped (nonfinite.action: skip)")
            return
        path = self.save_last_good(trainer)
        repeated = f" ({self.skipped_in_a_row} steps in a row were skipped before it)" if self.skipped_in_a_row else ""
        raise UserError(
            f"{where}{repeated}; saved the last good state to {path}. Lower model.init_args.base_lr or check "
            "the data, then run the same command to resume from it (or set nonfinite.action: skip)"
        )

    @staticmethod
    def save_last_good(trainer: L.Trainer) -> Path:
        """The parameters and optimiser are still those before the failing step: save them."""
        ckpt = trainer.checkpoint_callback
        folder = Path(ckpt.dirpath if ckpt is not None and ckpt.dirpath else trainer.default_root_dir)
        path = folder / f"last-good-step={trainer.global_step:08d}.ckpt"
        trainer.save_checkpoint(path)
        return path


def _grads(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


class CollapseWatch:
    """Counts the steps a run's outputs stay collapsed (spread below ``threshold``, or another
    sign the objective checks) and says when to warn: at the onset, and again every
    ``repeat_every`` steps for as long as it lasts, so a run that stays collapsed keeps saying
    so. Its state goes into checkpoints."""

    def __init__(self, threshold: float = 0.05) -> None:
        self.threshold = threshold
        self.collapsed_steps = 0  # steps spent collapsed, counted between checks
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
        self.collapsed_steps += max(1, elapsed)
        if self.since is None:
            self.since = self.last_warning = step
            return True
        if step - self.last_warning >= repeat_every:
            self.last_warning = step
            return True
        return False

    def state(self, step: int) -> str:
        """How a warning at ``step`` names the collapse: its onset, or how long it has lasted."""
        return "has collapsed" if self.since == step else f"is still collapsed (since step {self.since})"

    def state_dict(self) -> dict[str, int | None]:
        return {k: getattr(self, k) for k in ("collapsed_steps", "since", "last_check", "last_warning")}

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
