"""Evaluation built into pretraining: k-NN (and the probes) at the end of every run, k-NN every N
epochs, and optionally both at the start for the random-initialisation baseline."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ssl_vit.data.views import EvalView
from ssl_vit.distributed import log_folder
from ssl_vit.encoder import NO_CLASS_TOKEN
from ssl_vit.errors import UserError
from ssl_vit.eval.evaluator import Evaluator, Results
from ssl_vit.eval.features import FeatureSet
from ssl_vit.eval.image_text import ImageTextModel, evaluate_image_text, no_retrieval
from ssl_vit.eval.report import accuracy_counts, data_hash, metrics, print_results, with_files, write_records
from ssl_vit.periodic import Periodic
from ssl_vit.pictures import embedding_picture, line_chart, save_picture, shard_class_names

#: Evaluator settings that change no number: the data (compared by its files), and how it is read.
NOT_PROTOCOL = (
    *("train_shards", "val_shards"),
    *("knn_chunk_size", "token_cache_gib", "batch_size", "num_workers", "cache_dir"),
)


class EvaluationCallback(Evaluator, Periodic):
    """Runs the :class:`Evaluator` on the model's encoder during pretraining (on rank 0; the other
    ranks wait) and logs ``eval/knn_k20_top1``-style metrics at the current step.

    At the end it prints a table and writes ``last.knn.json`` / ``last.probe.json`` (and
    ``last.attentive.json``) beside ``last.ckpt``: the same records ``ssl-vit knn`` /
    ``ssl-vit probe`` write for that checkpoint.

    Args:
        train_shards, val_shards: what the evaluation reads; by default the run's own data
            (``ShardDataModule.evaluation_data``: its ``val`` folder or held-out part). When that
            data has no class labels, the evaluation is skipped with one line (health and
            pictures need none), and without label maps the dense probe is.
        every_n_steps, every_n_epochs: also run k-NN every n optimiser steps, or after every n-th
            epoch (0 = only at the end; see :class:`~ssl_vit.periodic.Periodic`).
        at_start: evaluate the freshly initialised encoder before training (the baseline).
        probes: run the probes ``head`` names (linear, attentive) at the start and the end too
            (k-NN always runs).
        **kwargs: the other :class:`Evaluator` settings.
    """

    def __init__(
        self,
        train_shards: str | None = None,
        val_shards: str | None = None,
        every_n_steps: int = 0,
        every_n_epochs: int = 0,
        at_start: bool = False,
        probes: bool = True,
        **kwargs: Any,
    ) -> None:
        Evaluator.__init__(self, train_shards or "", val_shards or "", **kwargs)
        Periodic.__init__(self, every_n_steps, every_n_epochs)
        self.follows_data = train_shards is None and val_shards is None
        self.at_start = at_start
        self.probes_at_ends = probes
        self.skipped: str | None = None  # why this run's data cannot be evaluated
        self.baseline: Results | None = None
        self.baseline_name = "random init"
        self.baseline_data: str | None = None  # what the baseline was measured on (evaluated_data)
        self.baseline_protocol: dict[str, Any] | None = None  # and how (protocol)
        self.knn_history: list[tuple[int, float]] = []
        # The recipe's protocol, before setup turns what the data cannot have off (the dense probe
        # without label maps): what a finished run started again is compared by.
        self.asked_protocol = self.protocol()
        self.counts: dict[str, Any] = {}  # the images and classes the last evaluation counted
        self.said_no_retrieval = False

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, probe: bool) -> Results | None:
        results: Results = {}
        if trainer.is_global_zero:
            start = time.perf_counter()
            encoder = pl_module.evaluated_encoder
            names = shard_class_names(self.val_shards) if not self.skipped else None
            with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training run's RNG
                if not self.skipped:
                    train, val = self.features(encoder, tokens=probe)
                    self.counts = accuracy_counts(train, val)
                    results = self.results(encoder, train, val, probe=probe)
                    self.draw(trainer, results, val, self.indexed_classes() or names)  # val's labels are train's
                if isinstance(pl_module, ImageTextModel):  # zero-shot and retrieval need no probe
                    view = EvalView(self._image_size(encoder))
                    image_text, _ = evaluate_image_text(  # counted by the k-NN's features already
                        pl_module, self.val_shards, view, names, self.batch_size, self.num_workers
                    )
                    if "retrieval" not in image_text and not self.said_no_retrieval:
                        rank_zero_info(no_retrieval(self.val_shards))  # once a run, not at every evaluation
                        self.said_no_retrieval = True
                    results.update(image_text)
            if results:
                logged = {**metrics(results), "eval/seconds": time.perf_counter() - start}
                for logger in trainer.loggers:
                    logger.log_metrics(logged, step=trainer.global_step)
        trainer.strategy.barrier("ssl_vit_evaluation")
        return results or None

    def draw(self, trainer: L.Trainer, results: Results, val: FeatureSet, names: list[str] | None) -> None:
        """The k-NN curve so far and a PCA map of the validation features, in ``pictures/``."""
        k = "k=20" if "k=20" in results["knn"] else next(iter(results["knn"]))
        self.knn_history.append((trainer.global_step, results["knn"][k]["top1"]))
        curve = line_chart({f"k-NN {k} top-1 %": self.knn_history}, "k-NN accuracy", y_label="top-1 %")
        save_picture(trainer, "knn", curve)
        title = f"evaluation features, PCA, step {trainer.global_step}"
        save_picture(trainer, "embedding_pca", embedding_picture(val.features, val.labels, title, class_names=names))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_data(getattr(trainer, "datamodule", None), pl_module)
        if self.pooling.startswith("cls") and not pl_module.evaluated_encoder.has_class_token:
            raise UserError(f"trainer.callbacks EvaluationCallback pooling {self.pooling}: {NO_CLASS_TOKEN}")

    def check_data(self, datamodule: L.LightningDataModule | None, pl_module: L.LightningModule) -> None:
        """The evaluation data, checked: a mistake stops the run. Called by the command line before
        anything is written too (Lightning makes the log folder before ``setup``)."""
        if not self.follows_data:
            self.check_shards()  # shards the recipe names
        elif not self.train_shards:
            self.train_shards, self.val_shards = datamodule.evaluation_data()
            self.skipped = self.unlabelled()
            if not self.skipped:
                self.indexed_classes()  # a val folder with other classes than train's stops before any work
            if self.skipped:
                kept = "; zero-shot too" if isinstance(pl_module, ImageTextModel) else ""
                rank_zero_warn(
                    f"{self.skipped}; k-NN and the probes are skipped{kept} (RankMe and pictures need no labels)"
                )
            elif self.segmentation and self.without_label_maps():
                self.segmentation = False
                # most folders have none: a line of information, not a warning on every user's run
                rank_zero_info(
                    f"the dense probe is skipped: {self.val_shards} has no segmentation label maps (`ssl-vit shards "
                    "imagefolder IMAGES OUT --masks MAPS` writes images with theirs)"
                )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_start and trainer.ckpt_path is None:  # a resumed run restores the baseline instead
            self.baseline = self._evaluate(trainer, pl_module, probe=self.probes_at_ends)
            # a run that continues other weights (init_from) starts from them, not from random ones
            self.baseline_name = "init_from" if getattr(pl_module, "init_from", None) else "random init"
            self.baseline_data = self.evaluated_data() if self.baseline else None
            self.baseline_protocol = self.protocol() if self.baseline else None
        else:
            self.drop_baseline_not_comparable()

    def evaluated_data(self) -> str:
        """A hash of what the evaluation reads now: both splits' files (:func:`data_hash`)."""
        return data_hash(self.train_shards, self.val_shards)

    def protocol(self) -> dict[str, Any]:
        """The settings the evaluation's numbers depend on (pooling, k, temperature, probes...)."""
        return {name: value for name, value in self.settings().items() if name not in NOT_PROTOCOL}

    def drop_baseline_not_comparable(self, files: str | None = None) -> None:
        """A baseline measured on other images than the evaluation reads now (images added,
        removed or rewritten since, e.g. before a resume), or by other evaluation settings (a
        resume's recipe), is no baseline for this run's numbers. ``files``: :meth:`evaluated_data`
        if the caller has it already."""
        if not self.baseline:
            return
        now = self.protocol()
        if self.baseline_data and self.baseline_data != (files or self.evaluated_data()):
            why = (
                f"the evaluation data ({self.train_shards}, {self.val_shards}) changed since the step-0 evaluation "
                "(images added, removed or rewritten)"
            )
        elif self.baseline_protocol is not None and self.baseline_protocol != now:
            changed = [f"{k} {v} -> {now.get(k)}" for k, v in self.baseline_protocol.items() if now.get(k) != v]
            why = f"the evaluation settings changed since the step-0 evaluation ({'; '.join(changed)})"
        else:
            return
        rank_zero_warn(
            f"{why}: the {self.baseline_name} column, measured as it was then, is left out of this run's tables and "
            "records; `ssl-vit knn` measures other weights on the images as they are now (docs/evaluation.md)"
        )
        self.baseline, self.baseline_data, self.baseline_protocol = None, None, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "baseline_name": self.baseline_name,
            "baseline_files": self.baseline_data,
            "baseline_protocol": self.baseline_protocol,
            "protocol": self.asked_protocol,  # a finished run's numbers are of it (RunCLI.stop_if_finished)
            "knn_history": self.knn_history,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = state_dict.get("baseline")
        self.baseline_name = state_dict.get("baseline_name", "random init")
        # "baseline_files": hashed by where the files are; an older state's hash is not comparable, so none
        self.baseline_data = state_dict.get("baseline_files")
        self.baseline_protocol = state_dict.get("baseline_protocol")  # None from before it was kept: not compared
        self.knn_history = [tuple(point) for point in state_dict.get("knn_history", [])]

    def periodic(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = self._evaluate(trainer, pl_module, probe=False)
        if results and "knn" in results:  # on the console too: the end's table is far off in a long run
            k = "k=20" if "k=20" in results["knn"] else next(iter(results["knn"]))
            then = (self.baseline or {}).get("knn", {}).get(k)
            since = f" ({self.baseline_name} {then['top1']:.1f})" if then else ""
            rank_zero_info(f"step {trainer.global_step}: k-NN {k} top-1 {results['knn'][k]['top1']:.1f}%{since}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = time.perf_counter()
        results = self._evaluate(trainer, pl_module, probe=self.probes_at_ends)
        if results is None:
            return
        settings = with_files(self.settings())  # the records' hash of the files, read once for both
        self.drop_baseline_not_comparable(settings["files"])
        title = f"{type(pl_module).__name__} after {trainer.global_step} steps"
        print_results(title, results, self.baseline, self.baseline_name, **self.counts)
        ckpt_dir = (
            Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else Path(log_folder(trainer))
        )
        info = {
            "method": type(pl_module).__name__,
            "encoder": dict(pl_module.hparams.get("encoder", {})),
            "step": trainer.global_step,
            "weights_id": getattr(trainer.checkpoint_callback, "weights_id", None),  # RunCheckpoint's
        }
        seconds = time.perf_counter() - start
        write_records(
            ckpt_dir / "last.ckpt",
            results,
            info,
            settings,
            seconds,
            self.baseline,
            baseline_name=self.baseline_name,
            counts=self.counts,
        )
