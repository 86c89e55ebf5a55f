"""A rich progress bar that also shows training throughput in images per second."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class ImagesPerSecondBar(RichProgressBar):
    """Lightning's rich bar plus ``img/s``, measured over the last ``window`` training batches
    (per device; multiply by the number of devices for the global rate)."""

    def __init__(self, window: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window = window
        self._marks: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        _, labels = batch
        self._marks = [*self._marks[-self.window :], (time.perf_counter(), len(labels))]
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._marks = []  # the loader restarts its workers: do not count that pause
        super().on_train_epoch_start(trainer, pl_module)

    def images_per_second(self) -> float | None:
        if len(self._marks) < 2:
            return None
        elapsed = self._marks[-1][0] - self._marks[0][0]
        return sum(n for _, n in self._marks[1:]) / elapsed if elapsed > 0 else None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if "train/lr" in metrics:  # the default 3 decimals would show 0.000
            metrics["train/lr"] = f"{float(metrics['train/lr']):.2e}"
        rate = self.images_per_second()
        if rate is not None:
            metrics["img/s"] = f"{rate:.0f}"
        return metrics
