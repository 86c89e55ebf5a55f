"""When periodic callbacks (mid-run k-NN, pictures) act: every n optimiser steps or epochs, once
per step under gradient accumulation, and never at the end, where the end-of-run work follows."""

from __future__ import annotations

from types import SimpleNamespace

from ssl_vit.periodic import Periodic


class Recorder(Periodic):
    def __init__(self, **every: int) -> None:
        super().__init__(**every)
        self.steps: list[int] = []

    def periodic(self, trainer, pl_module) -> None:
        self.steps.append(trainer.global_step)


def run(callback: Periodic, batches: int, accumulate: int = 1, max_steps: int = -1) -> None:
    trainer = SimpleNamespace(accumulate_grad_batches=accumulate, max_steps=max_steps, global_step=0)
    for batch_idx in range(batches):
        trainer.global_step = (batch_idx + 1) // accumulate
        callback.on_train_batch_end(trainer, None, {"loss": 0.0}, None, batch_idx)


def test_every_n_steps_once_per_optimiser_step_and_not_at_the_end():
    steps = Recorder(every_n_steps=4)
    run(steps, batches=12, max_steps=12)
    assert steps.steps == [4, 8]
    accumulated = Recorder(every_n_steps=4)
    run(accumulated, batches=24, accumulate=2, max_steps=12)  # steps 4 and 8 each end two batches
    assert accumulated.steps == [4, 8]


def test_every_n_epochs_not_at_the_last_epoch_nor_at_max_steps():
    for max_epochs, max_steps, expected in ((6, -1, [2, 4]), (None, 40, [2]), (-1, -1, [2, 4, 6])):
        epochs = Recorder(every_n_epochs=2)
        trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps, current_epoch=0, global_step=0)
        for epoch in range(6 if max_steps < 0 else 4):  # 10 steps an epoch: max_steps 40 ends with epoch 4
            trainer.current_epoch, trainer.global_step = epoch, 10 * (epoch + 1)
            epochs.on_train_epoch_end(trainer, None)
        assert epochs.steps == [10 * e for e in expected], (max_epochs, max_steps)
