"""DINO (Caron et al., 2021), following facebookresearch/dino ``main_dino.py``.

A student (encoder + DINO head) learns to match an EMA teacher's centred, sharpened output
distribution across crops: the teacher sees the 2 global crops, the student every crop.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ssl_vit.distributed import mean_over_ranks
from ssl_vit.ema import frozen_copy
from ssl_vit.encoder import EncoderConfig, ViTEncoder
from ssl_vit.errors import UserError
from ssl_vit.heads import DINOHead
from ssl_vit.losses import dino_loss, dino_teacher_probs, sinkhorn_knopp_teacher_probs
from ssl_vit.methods.base import SSLMethod
from ssl_vit.schedules import PaperRun, cosine_to, linear_warmup_then_constant


def embed_crops(encoder: ViTEncoder, head: nn.Module, crops: list[Tensor]) -> Tensor:
    """Head outputs of the CLS tokens of every crop, crops in order: the encoder runs once per
    run of equal-resolution crops (DINO's MultiCropWrapper), the head once on all of them."""
    cls = [encoder(torch.cat(list(group))).cls for _, group in groupby(crops, key=lambda crop: tuple(crop.shape[-2:]))]
    return head(torch.cat(cls))


class DINO(SSLMethod):
    """DINO pretraining (Caron et al., 2021).

    Defaults are the paper's ViT-S/16 settings: head 2048 / 256 / 65536 with a
    normalised last layer frozen for the first epoch, student temperature 0.1, teacher 0.04 ->
    0.07 over 30 epochs, centre momentum 0.9, teacher momentum 0.996 -> 1 (cosine; the end is
    ``teacher_momentum_end``), AdamW with lr 5e-4 x batch / 256 (10 warm-up epochs, cosine to
    1e-6) and weight decay 0.04 -> 0.4 (cosine),
    per-parameter gradient clipping at 3.0, local crops' position embeddings resampled as DINO does.
    ``centering: sinkhorn_knopp`` replaces the centre by DINOv2's Sinkhorn-Knopp targets (the
    quickstart uses them with the official code's constant teacher temperature 0.04; on small
    data the README's 0.07 made the teacher uniform with either centring).
    With ``scale_to_run`` the warm-ups shrink with a run shorter than
    100 epochs, and the teacher momentum follows the EMA scaling rule from batch 1024 on ImageNet."""

    #: main_dino.py: 100 epochs (10 warm-up), batch 64 x 16 GPUs
    paper_run = PaperRun(epochs=100, steps_per_epoch=1281167 // 1024)

    encoders: ClassVar[dict[str, str]] = {"teacher": "teacher_encoder", "student": "encoder"}
    ema_targets: ClassVar[dict[str, str]] = {"teacher_encoder": "encoder", "teacher_head": "head"}
    encoder_defaults: ClassVar[dict[str, Any]] = {"pos_embed_resample": "dino"}

    def __init__(
        self,
        encoder: EncoderConfig,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        use_bn_in_head: bool = False,
        freeze_last_layer_epochs: int = 1,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        center_momentum: float = 0.9,
        centering: Literal["mean", "sinkhorn_knopp"] = "mean",
        teacher_momentum: float = 0.996,
        teacher_momentum_end: float = 1.0,
        clip_grad: float = 3.0,
        base_lr: float = 5e-4,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        warmup_epochs: float = 10,
        min_lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        init_from: str | None = None,
        scale_to_run: bool = True,
    ) -> None:
        super().__init__(
            encoder,
            base_lr=base_lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
            betas=betas,
            init_from=init_from,
            weight_decay_end=weight_decay_end,
            scale_to_run=scale_to_run,
        )
        self.head = DINOHead(
            self.encoder.embed_dim,
            out_dim,
            hidden_dim,
            bottleneck_dim,
            norm_last_layer=norm_last_layer,
            use_bn=use_bn_in_head,
        )
        self.teacher_encoder = self.ema_encoder_copy()
        self.teacher_head = frozen_copy(self.head)
        if centering not in ("mean", "sinkhorn_knopp"):
            raise UserError(f"model.centering must be mean (DINO) or sinkhorn_knopp (DINOv2), got {centering!r}")
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._teacher_means: list[Tensor] = []  # this optimiser step's, one per micro-batch

    def teacher_temperature(self) -> float:
        hp = self.hparams
        warmup = round(self.run_epochs(hp.warmup_teacher_temp_epochs))
        return linear_warmup_then_constant(self.current_epoch, warmup, hp.warmup_teacher_temp, hp.teacher_temp)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        crops, _ = batch
        with torch.no_grad():
            teacher_out = embed_crops(self.teacher_encoder, self.teacher_head, crops[:2])
        student_out = embed_crops(self.encoder, self.head, crops)
        temp = self.teacher_temperature()
        targets = self.teacher_targets(teacher_out, temp, self.center, self._teacher_means)
        loss = dino_loss(student_out, targets, len(crops), self.hparams.student_temp)
        self.watch_collapse(teacher_out, teacher_probs=targets)
        self.log_dict({"train/loss": loss, "train/teacher_temp": temp}, prog_bar=True)
        return loss

    @torch.no_grad()
    def teacher_probs(self, images: Tensor) -> Tensor:
        teacher_out = embed_crops(self.teacher_encoder, self.teacher_head, [images])
        return self.teacher_targets(teacher_out, self.teacher_temperature(), self.center)

    def teacher_targets(self, teacher_out: Tensor, temp: float, center: Tensor, means: list | None = None) -> Tensor:
        """The teacher's targets: Sinkhorn-Knopp (DINOv2's), or a softmax around ``center`` (DINO's),
        whose running mean takes the batch's mean at the optimiser step (kept in ``means``)."""
        if self.hparams.centering == "sinkhorn_knopp":
            return sinkhorn_knopp_teacher_probs(teacher_out, temp)
        if means is not None:
            means.append(teacher_out.mean(dim=0, keepdim=True))
        return dino_teacher_probs(teacher_out, center, temp)

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        self.update_center(self.center, self._teacher_means)

    @torch.no_grad()
    def update_center(self, center: Tensor, means: list[Tensor]) -> None:
        """center <- m * center + (1 - m) * (mean teacher output over the global batch), once per
        optimiser step, from its micro-batches' means (which it then empties)."""
        if not means:
            return
        batch_center = mean_over_ranks(torch.cat(means).mean(dim=0, keepdim=True))
        m = self.hparams.center_momentum
        center.mul_(m).add_(batch_center, alpha=1 - m)
        means.clear()

    def on_after_backward(self) -> None:
        if self.current_epoch < self.hparams.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def gradient_clip_groups(self) -> list[list[nn.Parameter]]:
        # DINO clips each parameter's gradient norm on its own, not the global norm.
        return [[p] for p in self.parameters()]

    def ema_momentum(self, step: int) -> float:
        # main_dino.py: after optimiser step `it`, the teacher follows with momentum_schedule[it].
        # DINO's code ends at 1; DINOv2's final_momentum_teacher is a setting (1.0 there too).
        start = self.run_momentum(self.hparams.teacher_momentum)
        end = self.hparams.teacher_momentum_end
        end = self.run_momentum(end) if end < 1 else 1.0
        return cosine_to(step, int(self.trainer.estimated_stepping_batches), start, end)
