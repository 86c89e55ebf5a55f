"""DINOv3 (Siméoni et al., 2025): DINOv2's objective plus Gram anchoring, following
facebookresearch/dinov3 ``dinov3/loss/gram_loss.py``, ``dinov3/train/ssl_meta_arch.py`` and
``dinov3/train/train.py`` with the settings of ``configs/train/dinov3_vit7b16_gram_anchor.yaml``.

Over a long run the patch features of DINOv2-style training lose their locality. In its last
phase DINOv3 anchors them: the Gram matrix of the student's patch features (every patch's cosine
similarity with every other of its image) is pulled towards that of a *Gram teacher*, a frozen
copy of the EMA teacher taken when the phase starts and refreshed a few times early in it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ssl_vit.ema import frozen_copy
from ssl_vit.encoder import EncoderConfig, EncoderOutput
from ssl_vit.errors import UserError
from ssl_vit.losses import gram_loss
from ssl_vit.methods.dinov2 import DINOv2

#: dinov3_vit7b16_gram_anchor.yaml, as fractions of its 1,200 epochs of 1,000 iterations: the Gram
#: term from iteration 1,000,000 (L65-69: weight 0 for 1,000 epochs), a cosine to its weight over 1
#: epoch, and the Gram teacher refreshed every 10,000 iterations from 1,010,000 (L53-55), 3 times.
PAPER_ITERATIONS = 1_200_000


class DINOv3(DINOv2):
    """DINOv3 pretraining (Siméoni et al., 2025).

    On ssl-vit's ViT: DINOv2's DINO + iBOT + KoLeo with Sinkhorn-Knopp targets
    (every DINOv2 argument, with DINOv2's defaults), and the Gram term in the run's last part.

    Args:
        gram_start: where the Gram phase starts, as a fraction of the run (the paper's 1.0M of
            1.2M iterations); from there the Gram teacher is the EMA teacher's encoder.
        gram_ramp: the weight's cosine rise from 0, as a fraction of the run (1,000 iterations).
        gram_update_every: the Gram teacher takes the EMA teacher's weights again every this
            fraction of the run after the start (10,000 iterations) ...
        gram_max_updates: ... this many times (3), then stays.
        gram_loss_weight: the weight after the rise (2.0).
        gram_image_level: one Gram matrix per image (the configs' ``img_level: true``), else one
            over the batch's patches.
        gram_remove_neg: zero negative similarities (``remove_neg``, false in the configs).
        lr_warmup: the lr's rise, ``linear`` as in DINOv2 or ``cosine`` as the high-resolution
            stage's schedule (``dinov3_vit7b16_high_res_adapt.yaml``: 0 -> 1.25e-5 over 10 epochs).
    """

    eval_mode_modules: ClassVar[tuple[str, ...]] = ("gram_teacher",)

    def __init__(
        self,
        encoder: EncoderConfig,
        gram_start: float = 1_000_000 / PAPER_ITERATIONS,
        gram_ramp: float = 1_000 / PAPER_ITERATIONS,
        gram_update_every: float = 10_000 / PAPER_ITERATIONS,
        gram_max_updates: int = 3,
        gram_loss_weight: float = 2.0,
        gram_image_level: bool = True,
        gram_remove_neg: bool = False,
        lr_warmup: Literal["linear", "cosine"] = "linear",
        **dinov2_args: Any,
    ) -> None:
        if not 0 <= gram_start < 1:
            raise UserError(
                f"model.gram_start {gram_start} is a fraction of the run: from 0 to below 1 (DINOv3: 0.833)"
            )
        super().__init__(encoder, **dinov2_args)
        self.lr_warmup_shape = lr_warmup
        self.gram_teacher = frozen_copy(self.teacher_encoder)

    def gram_steps(self) -> tuple[int, int, int]:
        """(start, ramp, update period) in optimiser steps of this run."""
        hp, total = self.hparams, int(self.trainer.estimated_stepping_batches)
        return round(hp.gram_start * total), round(hp.gram_ramp * total), max(1, round(hp.gram_update_every * total))

    def gram_weight(self, step: int) -> float:
        """0 before the Gram phase, then a cosine rise to ``gram_loss_weight`` (``CosineScheduler``'s
        decay from 0 to the end value), then constant."""
        start, ramp, _ = self.gram_steps()
        if step < start:
            return 0.0
        progress = (step - start) / ramp if ramp else 1.0
        return self.hparams.gram_loss_weight * (1 - math.cos(math.pi * min(progress, 1.0))) / 2

    def takes_ema_teacher(self, step: int) -> bool:
        """Whether the Gram teacher becomes the EMA teacher before this step's forward: at the start
        of the Gram phase (``train.py`` L471-473) and every update period after it, at most
        ``gram_max_updates`` times (``train.py`` L535-544: after the optimiser step and the EMA
        update that precede this step)."""
        start, _, every = self.gram_steps()
        since = step - start
        return since >= 0 and since % every == 0 and since // every <= self.hparams.gram_max_updates

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.takes_ema_teacher(self.global_step):
            self.gram_teacher.load_state_dict(self.teacher_encoder.state_dict())

    def extra_loss(self, global_crops: Tensor, student: EncoderOutput, gram_crops: list[Tensor]) -> Tensor:
        """The Gram term on the student's masked global crops' patch tokens after the final norm
        (all of them, ``tokens_used: all``) against the Gram teacher's, unmasked, on the Gram
        crops (the same crops at a higher resolution, undistorted; its patch features resampled
        to the student's grid, ``ssl_meta_arch.py`` L496-510) or, without them, on the global crops."""
        weight = self.gram_weight(self.global_step)
        if weight == 0:
            return student.cls.new_zeros(())
        with torch.no_grad():
            if gram_crops:
                grid = [side // self.encoder.patch_size for side in global_crops.shape[-2:]]
                _, tokens = self.gram_teacher.pooled_and_map(torch.cat(gram_crops))
                tokens = F.interpolate(tokens, size=grid, mode="bicubic", align_corners=False, antialias=False)
                target = tokens.flatten(2).transpose(1, 2)
            else:
                target = self.gram_teacher(global_crops).patches
        hp = self.hparams
        loss = gram_loss(student.patches, target, image_level=hp.gram_image_level, remove_neg=hp.gram_remove_neg)
        self.log("train/gram_loss", loss, prog_bar=True)  # beside DINOv2's terms, which train/loss also sums
        self.log("train/gram_weight", weight)
        return weight * loss
