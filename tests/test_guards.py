"""The bad-numbers guard: its rule on synthetic loss and gradient-norm sequences, and the state it
keeps when an update blows the parameters up. (The end-to-end run, a learning rate a million
times too high through ``ssl-vit pretrain`` and its resume with a sane one, is
``case_lr_blowup_recovered`` in ``tests/fault_injection.py``.)"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ssl_vit.errors import UserError
from ssl_vit.guards import NonFiniteGuard
from tests.conftest import OBJECTIVES, fit_briefly


def first_abnormal_step(guard: NonFiniteGuard, losses: list[float], grad_norms: list[float]) -> int | None:
    for step, (loss, grad_norm) in enumerate(zip(losses, grad_norms, strict=True)):
        abnormal, _ = guard.judge({"loss": loss, "gradient norm": grad_norm})
        if abnormal:
            return step
    return None


def noisy_decreasing(steps: int = 300, seed: int = 0) -> tuple[list[float], list[float]]:
    """A loss falling from 11 to 3 and a gradient norm drifting from 0.3 to 3, each with 20% noise."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, steps)
    losses = (3 + 8 * np.exp(-5 * t)) * rng.lognormal(0, 0.2, steps)
    grad_norms = 0.3 * 10**t * rng.lognormal(0, 0.2, steps)
    return losses.tolist(), grad_norms.tolist()


def test_normal_training_with_spikes_never_trips():
    losses, grad_norms = noisy_decreasing()
    losses[100] *= 3  # a loss spike of a few x
    grad_norms[200] *= 30  # a gradient-norm spike like SimMIM's 13x, with margin
    grad_norms[1] *= 5  # and in the very first steps
    assert first_abnormal_step(NonFiniteGuard(), losses, grad_norms) is None


@pytest.mark.parametrize("quantity", ["loss", "gradient norm"])
def test_a_jump_by_orders_of_magnitude_trips_at_its_step(quantity):
    losses, grad_norms = noisy_decreasing()
    jumped = losses if quantity == "loss" else grad_norms
    jumped[150:] = [v * 1e4 for v in jumped[150:]]  # blown-up parameters: it stays high
    guard = NonFiniteGuard()
    assert first_abnormal_step(guard, losses, grad_norms) == 150
    # The abnormal value did not join the history: the next is judged against the same median.
    abnormal, _ = guard.judge({"loss": losses[151], "gradient norm": grad_norms[151]})
    assert abnormal == [quantity]


def test_non_finite_values_trip_from_the_first_step_and_spikes_are_no_restore_points():
    guard = NonFiniteGuard()
    assert guard.judge({"loss": math.nan, "gradient norm": 1.0}) == (["loss"], False)
    assert guard.judge({"loss": 1.0, "gradient norm": math.inf}) == (["gradient norm"], False)
    for _ in range(5):
        assert guard.judge({"loss": 1.0, "gradient norm": 1.0}) == ([], True)
    # 30x: not abnormal, but a step on the way up is not kept as the good state.
    assert guard.judge({"loss": 30.0, "gradient norm": 1.0}) == ([], False)
    assert guard.judge({"loss": 2000.0, "gradient norm": 1.0}) == (["loss"], False)


class BlowUpAfterStep(L.Callback):
    """After optimiser step ``step``'s update, multiply every parameter by 1000: an update that
    breaks the parameters while its own loss and gradients looked normal."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step + 1:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(1000)


def flat_tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """A nested state dict's tensors by dotted path, copied."""
    flat = {}
    for key, value in state.items():
        if isinstance(value, dict):
            flat |= flat_tensors(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value.clone()
    return flat


class StateBeforeEachUpdate(L.Callback):
    """The module's and the optimiser's tensors at each step's check, before its update."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        state = {"state_dict": pl_module.state_dict(), "optimizer": optimizer.state_dict()["state"]}
        self.states[trainer.global_step] = flat_tensors(state)


@pytest.mark.filterwarnings("ignore:abnormal loss at step .* step skipped")
@pytest.mark.parametrize(("action", "snapshot_every", "saved_step"), [("stop", 1, 3), ("skip", 1, 3), ("stop", 2, 2)])
def test_the_saved_state_is_from_before_the_breaking_update(
    tmp_path: Path, action: str, snapshot_every: int, saved_step: int
):
    """Step 3's update breaks the parameters; step 4's loss is abnormal. With ``stop`` the run
    stops there, with ``skip`` after two skipped steps (the parameters stay broken): either way the
    state saved is step 3's, before that update, optimiser state and all; with a restore point
    every second step, step 2's."""
    factory, view = OBJECTIVES["mae"]
    recorded = StateBeforeEachUpdate()
    guard = NonFiniteGuard(action=action, max_consecutive_skips=2, snapshot_every=snapshot_every)
    stop_step = 4 if action == "stop" else 6
    with pytest.raises(UserError, match=rf"abnormal loss at step {stop_step} of MAE \(loss .* times the median"):
        fit_briefly(
            factory(),
            view,
            steps=8,
            num_images=32,
            callbacks=[recorded, guard, BlowUpAfterStep(3)],
            default_root_dir=tmp_path,
        )
    path = tmp_path / f"last-good-step={saved_step:08d}.ckpt"
    assert list(tmp_path.glob("*.ckpt")) == [path]
    saved = torch.load(path, weights_only=True)
    assert saved["global_step"] == saved_step
    tensors = flat_tensors({"state_dict": saved["state_dict"], "optimizer": saved["optimizer_states"][0]["state"]})
    expected = recorded.states[saved_step]
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], v) for k, v in expected.items())
    progress = saved["loops"]["fit_loop"]["epoch_loop.automatic_optimization.optim_progress"]
    assert progress["optimizer"]["step"]["total"]["completed"] == saved_step
