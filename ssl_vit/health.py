"""Label-free health of a pretraining run, measured the same way all run long on a fixed batch of
held images: RankMe (the effective rank of the representation), the embeddings' spread, and, for
teacher-student objectives, the teacher's entropy and how many of its prototypes are in use.
No labels needed, so a run on a user's unlabelled shards still says whether it is learning."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ssl_vit.errors import counted
from ssl_vit.guards import BEFORE_ANY_UPDATE, CollapseWatch
from ssl_vit.pictures import held_images, line_chart, save_picture

#: The legend names of the health series in the pictures.
RANKME_SERIES = {"rankme_cls": "CLS token", "rankme_mean": "mean of the patch tokens"}
SPREAD_SERIES = {
    "spread": "spread",
    "teacher_entropy": "teacher entropy / ln K",
    "prototypes_used": "fraction of prototypes in use",
}


def rankme(embeddings: Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., ICML 2023, eq. 1): exp of the entropy of the singular values of the
    (N, D) embedding matrix normalised to sum to 1 (plus ``eps``). Between 1 (every embedding on
    one line) and min(N, D) (all directions used equally)."""
    singular = torch.linalg.svdvals(embeddings.detach().double())
    p = singular / singular.sum() + eps
    return math.exp(-(p * p.log()).sum().item())


def embedding_spread(embeddings: Tensor) -> float:
    """The per-dimension std of the L2-normalised embeddings, times sqrt(dim): about 1 for
    well-spread embeddings, 0 when all are identical; scale-free."""
    z = F.normalize(embeddings.detach().float(), dim=1)
    return z.std(dim=0).mean().item() * z.shape[1] ** 0.5


def teacher_health(teacher_probs: Tensor) -> tuple[float, float]:
    """Of a teacher's (B, K) target distributions: their mean entropy as a fraction of ln K, and
    the fraction of the K prototypes that are some image's most likely one."""
    p = teacher_probs.detach().float()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1).mean().item()
    return entropy / math.log(p.shape[1]), p.argmax(dim=1).unique().numel() / p.shape[1]


#: Fewer held images than this cannot tell a collapse (RankMe below 2) from a healthy
#: representation, whose RankMe on n images is at most n.
MIN_HELD_IMAGES = 8


class HealthCallback(L.Callback):
    """Before the first step, regularly during the run and at its end: the evaluated encoder's CLS
    and mean-pooled patch features of ``num_images`` held images (the first ones of ``shards``;
    default: the run's evaluation data): ``health/rankme_cls`` (for encoders with a CLS token),
    ``health/rankme_mean``, ``health/spread`` (of the CLS token, else of the mean), and for
    objectives with a teacher ``health/teacher_entropy`` and ``health/prototypes_used``,
    logged and drawn in ``pictures/health-*.png``.

    A representation whose RankMe is below ``min_rankme`` for both poolings has collapsed onto a
    line: the run warns at that step and again every tenth of the run while it lasts, and
    ``summary.json`` counts the steps (``representation_collapsed_steps``).

    Args:
        every_n_steps: check every n optimiser steps; 0 (default) = as often as ``max_overhead``
            of the training time allows: after each check the next is placed (check time) /
            (max_overhead x mean step time) steps later, at least ``log_every_n_steps``; the
            decision is rank 0's, broadcast, so every rank checks at the same steps.
        num_images: RankMe can reach at most min(num_images, feature dim); 256 ranks every
            encoder up to ViT-S fully and costs one forward pass of a batch.
    """

    def __init__(
        self,
        shards: str | None = None,
        num_images: int = 256,
        every_n_steps: int = 0,
        max_overhead: float = 0.01,
        min_rankme: float = 2.0,
    ) -> None:
        self.shards = shards
        self.num_images = num_images
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.min_rankme = min_rankme
        self.images: Tensor | None = None
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.watch = CollapseWatch(before_training=0)  # the check at step 0 comes before the first step
        self.next_check = 0
        self._step_seconds: list[float] = []  # the optimiser steps' wall times since the last check
        self._step_start = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.images is not None:
            return
        size = pl_module.evaluated_encoder.image_size
        shards = self.shards or trainer.datamodule.evaluation_data()[1]
        self.images = held_images(shards, size, self.num_images)
        held = 0 if self.images is None else len(self.images)
        if held < min(self.num_images, MIN_HELD_IMAGES):
            rank_zero_warn(
                f"the health checks are skipped: {shards} has {counted(held, 'image')}, and RankMe, at most the "
                f"number of images, tells a collapse from a healthy representation on {MIN_HELD_IMAGES} or more "
                "(add images, or give a val folder beside a train folder)"
            )
            self.images = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            self.check(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._step_seconds.append(time.perf_counter() - self._step_start)
        step = trainer.global_step
        if step >= self.next_check and step != self.watch.last_check:  # once per optimiser step
            self.check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.watch.last_check:
            self.check(trainer, pl_module)  # the run's final state
        if trainer.is_global_zero and self.history:
            self.draw(trainer)

    @torch.no_grad()
    def measure(self, pl_module: L.LightningModule) -> dict[str, float]:
        """The health metrics of the model as it is now, on the held images."""
        was_training = pl_module.training
        pl_module.eval()
        images = self.images.to(pl_module.device)
        out = pl_module.evaluated_encoder(images)
        mean = out.patches.float().mean(dim=1)
        metrics = {"rankme_mean": rankme(mean), "spread": embedding_spread(mean)}
        if out.has_class_token:
            cls = out.cls.float()
            metrics |= {"rankme_cls": rankme(cls), "spread": embedding_spread(cls)}
        probs = pl_module.teacher_probs(images)
        if probs is not None:
            metrics["teacher_entropy"], metrics["prototypes_used"] = teacher_health(probs)
        pl_module.train(was_training)
        return metrics

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank measures (sharded encoders need all ranks in the forward pass); rank 0 logs.
        if self.images is None:
            return
        step = trainer.global_step
        start = time.perf_counter()
        metrics = self.measure(pl_module)
        self.schedule_next(trainer, step, time.perf_counter() - start)
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((step, value))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"health/{k}": v for k, v in metrics.items()}, step=step)
        rank = max(metrics.get("rankme_cls", 0.0), metrics["rankme_mean"])
        total = int(trainer.estimated_stepping_batches)
        if self.watch.update(step, collapsed=rank < self.min_rankme, repeat_every=max(1, total // 10)):
            rank_zero_warn(
                f"{type(pl_module).__name__}'s representation {self.watch.state(step)} at step {step} "
                f"({self.watch.collapsed_steps} steps so far): the RankMe of its features on held images is "
                f"{rank:.2f} < {self.min_rankme}, every image on nearly one line. "
                + (BEFORE_ANY_UPDATE if step == 0 else pl_module.collapse_advice)
            )

    def schedule_next(self, trainer: L.Trainer, step: int, check_seconds: float) -> None:
        """The step of the next check: fixed, or the fewest steps whose training time the check's
        cost stays within ``max_overhead`` of (before any step is timed: ``log_every_n_steps``)."""
        interval = self.every_n_steps
        if not interval:
            interval = max(1, trainer.log_every_n_steps)
            if self._step_seconds:
                step_seconds = sum(self._step_seconds) / len(self._step_seconds)
                interval = max(interval, math.ceil(check_seconds / (self.max_overhead * step_seconds)))
            interval = trainer.strategy.broadcast(interval, src=0)
        self._step_seconds.clear()
        self.next_check = step + interval

    def draw(self, trainer: L.Trainer) -> None:
        ranks = {label: self.history[k] for k, label in RANKME_SERIES.items() if k in self.history}
        title = f"RankMe of {len(self.images)} held images' features (collapsed below {self.min_rankme:g})"
        save_picture(trainer, "health-rankme", line_chart(ranks, title, y_label="RankMe (effective rank)"))
        # Only what this objective measures: teacher entropy and prototypes exist only with a teacher.
        spread = {label: self.history[k] for k, label in SPREAD_SERIES.items() if k in self.history}
        title = "embedding spread" + (" and the teacher's targets" if "teacher_entropy" in self.history else "")
        # All three are fractions of at most about 1; a tenth of that is the smallest span shown.
        chart = line_chart(spread, title, y_label="fraction", min_span=0.1, y_bounds=(0.0, 1.05))
        save_picture(trainer, "health-spread", chart)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "watch": self.watch.state_dict(), "next_check": self.next_check}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in state_dict.get("history", {}).items()}
        self.watch.load_state_dict(state_dict.get("watch", {}))
        self.next_check = state_dict.get("next_check", 0)
