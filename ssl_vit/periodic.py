"""When a periodic callback acts during training: every n optimiser steps or every n epochs
(not at the run's last step or epoch, where its end-of-run work follows)."""

from __future__ import annotations

from typing import Any

import lightning as L


class Periodic(L.Callback):
    """Calls :meth:`periodic` every ``every_n_steps`` optimiser steps and after every
    ``every_n_epochs``-th epoch (0 = never), except at the end of the run. Step intervals suit
    recipes whose budget is in steps (the quickstarts: the same work on any folder's size);
    epoch intervals suit long runs over a fixed dataset."""

    def __init__(self, every_n_steps: int = 0, every_n_epochs: int = 0) -> None:
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs

    def periodic(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0  # not between accumulated batches
        if self.every_n_steps and stepped and step % self.every_n_steps == 0 and step != trainer.max_steps:
            self.periodic(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        ended = epoch == trainer.max_epochs or trainer.global_step == trainer.max_steps
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and not ended:
            self.periodic(trainer, pl_module)
