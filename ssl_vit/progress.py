"""What the terminal shows: a rich progress bar with images per second, loss, lr and time left,
and a table summing up a finished run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import ProcessingSpeedColumn
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.console import Console
from rich.progress import Task
from rich.table import Table
from rich.text import Text

from ssl_vit.distributed import log_folder
from ssl_vit.eval.callback import EvaluationCallback
from ssl_vit.eval.report import RECORD_KINDS
from ssl_vit.health import HealthCallback


class MeasuredSpeedColumn(ProcessingSpeedColumn):
    """Lightning's it/s column, blank until rich has measured a speed: an epoch of one step would
    otherwise show "0.00it/s"."""

    def render(self, task: Task) -> Text:
        return Text("") if task.speed is None else super().render(task)


class ImagesPerSecondBar(RichProgressBar):
    """Lightning's rich bar plus ``img/s``, the run's: measured over the last ``window`` training
    batches of one device, times the devices (DDP keeps them in step, on equal batches), the pauses
    between them included (a new epoch's loader start, a mid-run evaluation): on a small folder of
    a few batches an epoch, those are much of the run's time.

    Where the output is not a terminal (a log file, a batch job), rich draws the bar only when it
    stops, so the run would say nothing for its whole length: there it prints a plain line every
    ``file_every_s`` seconds and at the last step instead."""

    def __init__(self, window: int = 20, file_every_s: float = 30.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.window = window
        self.file_every_s = file_every_s
        self._marks: list[tuple[float, int]] = []
        self._last_line = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        _, labels = batch
        self._marks = [*self._marks[-self.window :], (time.perf_counter(), len(labels))]
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._console is not None and not self._console.is_terminal and trainer.is_global_zero:
            last = trainer.global_step >= self.total_steps(trainer)
            if last or self._marks[-1][0] - self._last_line >= self.file_every_s:
                self._last_line = self._marks[-1][0]
                self._console.print(self.progress_line(trainer, pl_module), markup=False, highlight=False)

    def _init_progress(self, trainer: L.Trainer) -> None:
        super()._init_progress(trainer)
        if self.progress is not None and not self._console.is_terminal:  # the lines above say it all
            self.progress.live.transient = True  # rich would print the bar once, when it stops

    @staticmethod
    def total_steps(trainer: L.Trainer) -> int:
        return trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)

    def progress_line(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        """``step 120/312 (38%)  train/lr 1.20e-03  train/loss 4.21  img/s 310  0:01:20 left``"""
        step, total = trainer.global_step, self.total_steps(trainer)
        shown = {
            k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.startswith("train/") or k == "img/s"
        }
        words = [f"step {step}/{total} ({100 * step // max(total, 1)}%)"]
        words += [
            f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in shown.items()
        ]
        elapsed = self._marks[-1][0] - self._marks[0][0]
        if len(self._marks) > 1 and elapsed > 0 and step < total:
            seconds_per_step = elapsed / (len(self._marks) - 1) * trainer.accumulate_grad_batches  # marks are batches
            left = round((total - step) * seconds_per_step)
            words.append(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left")
        return "  ".join(words)

    def images_per_second(self, devices: int = 1) -> float | None:
        if len(self._marks) < 2:
            return None
        elapsed = self._marks[-1][0] - self._marks[0][0]
        return devices * sum(n for _, n in self._marks[1:]) / elapsed if elapsed > 0 else None

    def configure_columns(self, trainer: L.Trainer) -> list:
        *columns, speed = super().configure_columns(trainer)
        return [*columns, MeasuredSpeedColumn(speed.style)]

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's "Epoch 2/-2" when max_epochs is -1 (no limit, the run stops at max_steps)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if "train/lr" in metrics:  # the default 3 decimals would show 0.000
            metrics["train/lr"] = f"{float(metrics['train/lr']):.2e}"
        rate = self.images_per_second(trainer.world_size)
        if rate is not None:
            metrics["img/s"] = f"{rate:.0f}"
        return metrics


class ModuleTable(RichModelSummary):
    """The model's top-level modules with their parameter counts, at the start of a run:
    Lightning's rich summary without its FLOPs columns, which count nothing unless a module
    declares an example input (none of ssl-vit's do)."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int, *args, **kwargs
    ) -> None:
        columns = dict(summary_data)
        table = Table("module", "type", "parameters", "mode", header_style="bold magenta")
        for row in zip(columns["Name"], columns["Type"], columns["Params"], columns["Mode"], strict=True):
            table.add_row(*row)
        trainable = get_human_readable_count(int(trainable_parameters))
        table.caption = f"{get_human_readable_count(int(total_parameters))} parameters, {trainable} trainable"
        Console().print(table)


def run_summary(
    trainer: L.Trainer, model: L.LightningModule, seconds: float, checkpoint: Path | None, export_dir: Path | None
) -> dict[str, Any]:
    """What a finished run produced: its objective, encoder, steps, time, final loss, the end-of-run
    k-NN / probe / attentive-probe / zero-shot top-1, mIoU and retrieval R@1 (from the evaluation
    records its evaluation wrote at its last step) and how many evaluation images they count, how
    many steps its outputs were collapsed (objectives that watch for it), the last RankMe of its
    representation and how many steps that had collapsed (:class:`HealthCallback`), and where
    things are."""
    accuracy = {}
    weights = getattr(trainer.checkpoint_callback, "weights_id", None)  # RunCheckpoint's
    for kind in RECORD_KINDS:
        record = Path(trainer.checkpoint_callback.dirpath) / f"last.{kind}.json"
        record = json.loads(record.read_text()) if record.exists() else {}
        # not this run's end-of-run evaluation: of an earlier step, or of other weights at this step
        # (a run rewound by --ckpt_path whose evaluation leaves this protocol out)
        if record.get("step") != trainer.global_step or record.get("weights_id", weights) != weights:
            continue
        results = record["results"]
        accuracy[kind] = results.get("k=20", {}) if kind == "knn" else results  # no k=20: fewer training images
    encoder = dict(model.hparams.get("encoder", {}))
    pictures = Path(trainer.default_root_dir) / "pictures"
    watch = model.collapse_watch
    health = next((c for c in trainer.callbacks if isinstance(c, HealthCallback)), None)
    evaluation = next((c for c in trainer.callbacks if isinstance(c, EvaluationCallback)), None)

    def last_health(metric: str) -> float | None:
        return round(health.history[metric][-1][1], 2) if health and metric in health.history else None

    return {
        "objective": type(model).__name__,
        "encoder": ", ".join(f"{k}={v}" for k, v in encoder.items()),
        "steps": trainer.global_step,
        "seconds": round(seconds, 1),
        "final_loss": model.final_loss(),
        # on a small held-out part a point may be a fraction of one image
        "evaluation_images": evaluation.counts.get("val_images") if evaluation and accuracy else None,
        "knn_k20_top1": accuracy.get("knn", {}).get("top1"),
        "probe_top1": accuracy.get("probe", {}).get("top1"),
        "attentive_top1": accuracy.get("attentive", {}).get("top1"),
        "seg_miou": accuracy.get("segmentation", {}).get("miou"),
        "zeroshot_top1": accuracy.get("zeroshot", {}).get("top1"),  # image-text objectives
        "retrieval_image_to_text_R@1": accuracy.get("retrieval", {}).get("image_to_text", {}).get("R@1"),
        "collapsed_steps": watch.collapsed_steps if watch.last_check is not None else None,  # watched objectives
        # None when no check saw the model after an update (a run shorter than log_every_n_steps)
        "collapsed_at_end": watch.since is not None if watch.last_check else None,
        "rankme_cls": last_health("rankme_cls"),
        "rankme_mean": last_health("rankme_mean"),
        "representation_collapsed_steps": health.watch.collapsed_steps if health and health.history else None,
        "representation_collapsed_at_end": health.watch.since is not None if health and health.history else None,
        "settings_changed": getattr(trainer.checkpoint_callback, "settings_changed", None) or None,  # by resumes
        "checkpoint": str(checkpoint) if checkpoint else None,
        "weights_id": getattr(trainer.checkpoint_callback, "weights_id", None),  # its weights (RunCheckpoint)
        "export": str(export_dir) if export_dir else None,
        "pictures": str(pictures) if pictures.exists() else None,
        "logs": log_folder(trainer),
    }


def print_run_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['objective']} run", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    shown = {key: value for key, value in summary.items() if value is not None and key != "weights_id"}  # for matching
    rows = [
        (key.replace("_", " "), "; ".join(value) if isinstance(value, list) else str(value))
        for key, value in shown.items()
    ]
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a log file: wide enough for no path (one word) to be cut in two
        words = [len(key) + len(value) for key, value in rows if " " not in value]  # sentences wrap
        console = Console(width=max(80, *words) + 7)
    console.print(table)
