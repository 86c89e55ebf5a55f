"""DINOv2 (Oquab et al., 2023), following facebookresearch/dinov2 ``dinov2/train/ssl_meta_arch.py``
and ``configs/ssl_default_config.yaml``.

DINO's image-level self-distillation across crops (reused from :mod:`ssl_vit.methods.dino`), plus
iBOT's patch-level loss: the student sees some of its global crops with blocks of patches
replaced by a mask token and predicts, at those patches, the teacher's distribution for the
unmasked crop; plus KoLeo on the student's CLS features, which spreads them over the sphere.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ssl_vit.ema import frozen_copy
from ssl_vit.encoder import EncoderConfig, EncoderOutput
from ssl_vit.errors import UserError
from ssl_vit.heads import DINOHead
from ssl_vit.losses import dino_loss, ibot_patch_loss, koleo_loss
from ssl_vit.masking import ibot_masks
from ssl_vit.methods.dino import DINO, embed_crops
from ssl_vit.schedules import PaperRun


def check_ibot_masking(ratio_range: tuple[float, float], mask_probability: float, ibot_loss_weight: float) -> None:
    """Stop before training on iBOT masking that cannot work, with what to set instead."""
    lo, hi = ratio_range
    if not 0 < lo <= hi < 1:
        raise UserError(
            f"model.mask_ratio_range {list(ratio_range)}: iBOT's per-crop mask ratios must lie in (0, 1), "
            "the lower first; DINOv2's are [0.1, 0.5]"
        )
    if not 0 <= mask_probability <= 1:
        raise UserError(f"model.mask_probability {mask_probability} is the fraction of global crops masked: 0 to 1")
    if ibot_loss_weight > 0 and mask_probability == 0:
        raise UserError(
            f"model.ibot_loss_weight {ibot_loss_weight} with model.mask_probability 0: no global crop is masked, so "
            "iBOT has no patch to learn from; set mask_probability (DINOv2: 0.5) or ibot_loss_weight 0"
        )


def split_gram_crops(crops: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """A multi-crop batch's student crops (global, then local) and, after them, the crops larger
    than the global ones: DINOv3's Gram teacher crops (``MultiCropViews``' ``gram_size``)."""
    larger = [i for i, crop in enumerate(crops) if crop.shape[-1] > crops[0].shape[-1]]
    first = larger[0] if larger else len(crops)
    return crops[:first], crops[first:]


class DINOv2(DINO):
    """DINOv2 pretraining (Oquab et al., 2024).

    Defaults are ``ssl_default_config.yaml``'s: DINO head 2048 / 256 /
    65536 shared by the iBOT loss (``ibot_separate_head`` builds its own, ``ibot_hidden_dim`` /
    ``ibot_bottleneck_dim`` / ``ibot_out_dim``, 2048 / 256 / 65536), both heads' prototype norms
    (the last layer's weight-norm magnitude) starting at 1 and trained, half of the global
    crops masked with per-crop ratios spread over (0.1, 0.5), loss = DINO + 1.0 x iBOT + 0.1 x
    KoLeo, Sinkhorn-Knopp teacher targets (``centering: mean`` for DINO's centre, one for the CLS
    and one for the patches), teacher 0.04 -> 0.07 over 30 epochs per step, teacher momentum 0.992
    -> 1, AdamW at 0.004 x sqrt(batch / 1024) (10 warm-up epochs, cosine to 1e-6), weight decay
    0.04 -> 0.4, layer-wise lr decay 0.9 with the patch embedding at 0.2 of its layer's lr, the
    heads' last layers at lr 0 for the first epoch, gradients clipped to norm 3.0 per module
    (encoder, each head), layer scale 1e-5 (timm ``init_values``), drop path at one rate in every
    block. Registers are the encoder's ``reg_tokens``, which timm gives a position of their own
    (DINOv2 does not)."""

    #: ssl_default_config.yaml: 100 "epochs" of 1,250 iterations each (OFFICIAL_EPOCH_LENGTH)
    paper_run = PaperRun(epochs=100, steps_per_epoch=1250)
    #: dinov2/utils/config.py, "sqrt_wrt_1024"
    lr_batch_divisor: ClassVar[int] = 1024
    lr_batch_rule: ClassVar[Literal["linear", "sqrt"]] = "sqrt"
    #: ssl_default_config.yaml: layer scale 1e-5, the drop-path rate in every block (drop_path_uniform)
    encoder_defaults: ClassVar[dict[str, Any]] = {
        "pos_embed_resample": "dino",
        "init_values": 1e-5,
        "drop_path_uniform": True,
    }

    def __init__(
        self,
        encoder: EncoderConfig,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        ibot_separate_head: bool = False,
        ibot_out_dim: int = 65536,
        ibot_hidden_dim: int = 2048,
        ibot_bottleneck_dim: int = 256,
        mask_ratio_range: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        ibot_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        freeze_last_layer_epochs: int = 1,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        center_momentum: float = 0.9,
        centering: Literal["mean", "sinkhorn_knopp"] = "sinkhorn_knopp",
        teacher_momentum: float = 0.992,
        teacher_momentum_end: float = 1.0,
        clip_grad: float = 3.0,
        base_lr: float = 4e-3,
        layer_decay: float = 0.9,
        patch_embed_lr_mult: float = 0.2,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        warmup_epochs: float = 10,
        min_lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        init_from: str | None = None,
        scale_to_run: bool = True,
    ) -> None:
        check_ibot_masking(mask_ratio_range, mask_probability, ibot_loss_weight)
        super().__init__(
            encoder,
            out_dim=out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            norm_last_layer=False,  # dinov2/layers/dino_head.py: g starts at 1 and trains
            use_bn_in_head=False,
            freeze_last_layer_epochs=freeze_last_layer_epochs,
            student_temp=student_temp,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            center_momentum=center_momentum,
            centering=centering,
            teacher_momentum=teacher_momentum,
            teacher_momentum_end=teacher_momentum_end,
            clip_grad=clip_grad,
            base_lr=base_lr,
            weight_decay=weight_decay,
            weight_decay_end=weight_decay_end,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
            betas=betas,
            init_from=init_from,
            scale_to_run=scale_to_run,
        )
        # The student's mask token (the official backbone's, zeros at the start), replacing the
        # patch embedding of masked patches before the position embedding is added.
        self.mask_token = nn.Parameter(torch.zeros(1, self.encoder.embed_dim))
        if ibot_separate_head:
            self.ibot_head = DINOHead(
                self.encoder.embed_dim, ibot_out_dim, ibot_hidden_dim, ibot_bottleneck_dim, norm_last_layer=False
            )
            self.teacher_ibot_head = frozen_copy(self.ibot_head)
            self.ema_targets = {**DINO.ema_targets, "teacher_ibot_head": "ibot_head"}
        # ssl_meta_arch's teacher.eval(): its targets without DINOv3's RoPE coordinate jitter, dropout or drop path
        self.eval_mode_modules = tuple(dict.fromkeys((*self.eval_mode_modules, *self.ema_targets)))
        self.register_buffer("patch_center", torch.zeros(1, ibot_out_dim if ibot_separate_head else out_dim))
        self._patch_means: list[Tensor] = []

    def heads(self) -> tuple[nn.Module, nn.Module]:
        """(student, teacher) heads of the iBOT loss: DINO's own unless ``ibot_separate_head``."""
        if self.hparams.ibot_separate_head:
            return self.ibot_head, self.teacher_ibot_head
        return self.head, self.teacher_head

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        crops, gram_crops = split_gram_crops(batch[0])
        hp = self.hparams
        global_crops = torch.cat(crops[:2])  # [view 0 of every image; view 1 of every image]
        grid = (global_crops.shape[-2] // self.encoder.patch_size, global_crops.shape[-1] // self.encoder.patch_size)
        # Fresh masks from the run's seeded torch RNG (restored on resume), as the collate draws them.
        rng = random.Random(int(torch.randint(0, 2**62, ())))
        masks = ibot_masks(len(global_crops), grid, rng, hp.mask_ratio_range, hp.mask_probability)
        # As the official `do_ibot`: no iBOT term at weight 0, nor for a batch with nothing masked.
        do_ibot = hp.ibot_loss_weight > 0 and bool(masks.any())
        masks = masks.to(global_crops.device)

        with torch.no_grad():
            teacher = self.teacher_encoder(global_crops)
            teacher_cls = self.teacher_head(teacher.cls)
        student = self.encoder(global_crops, mask=masks, mask_token=self.mask_token)
        local_cls = embed_crops(self.encoder, nn.Identity(), crops[2:]) if len(crops) > 2 else student.cls[:0]
        student_cls = self.head(torch.cat([student.cls, local_cls]))

        temp = self.teacher_temperature()
        cls_targets = self.teacher_targets(teacher_cls, temp, self.center, self._teacher_means)
        dino = dino_loss(student_cls, cls_targets, len(crops), hp.student_temp)
        ibot = self.ibot_loss(teacher.patches, student.patches, masks, temp) if do_ibot else dino.new_zeros(())
        koleo = sum(koleo_loss(view) for view in student.cls.chunk(2))
        extra = self.extra_loss(global_crops, student, gram_crops)
        loss = dino + hp.ibot_loss_weight * ibot + hp.koleo_loss_weight * koleo + extra
        self.watch_collapse(teacher_cls, teacher_probs=cls_targets)
        self.log_dict(
            {"train/loss": loss, "train/dino_loss": dino, "train/ibot_loss": ibot, "train/koleo_loss": koleo},
            prog_bar=True,
        )
        self.log("train/teacher_temp", temp)
        return loss

    def extra_loss(self, global_crops: Tensor, student: EncoderOutput, gram_crops: list[Tensor]) -> Tensor:
        """A weighted term that an objective built on DINOv2 adds, from the global crops, the
        student's (masked) output on them and the view's Gram teacher crops: DINOv3's Gram
        anchoring. None in DINOv2, which has no use for Gram teacher crops."""
        if gram_crops:
            raise UserError(
                f"{type(self).__name__} has no Gram teacher: drop data.view.init_args.gram_size (DINOv3 uses it)"
            )
        return student.cls.new_zeros(())

    def ibot_loss(self, teacher_patches: Tensor, student_patches: Tensor, masks: Tensor, temp: float) -> Tensor:
        """iBOT on the masked patches: the student's head output against the teacher's targets."""
        student_ibot_head, teacher_ibot_head = self.heads()
        with torch.no_grad():
            teacher_out = teacher_ibot_head(teacher_patches[masks])
        targets = self.teacher_targets(teacher_out, temp, self.patch_center, self._patch_means)
        return ibot_patch_loss(student_ibot_head(student_patches[masks]), targets, masks, self.hparams.student_temp)

    def teacher_temperature(self) -> float:
        """DINOv2 warms the teacher temperature up per iteration (DINO per epoch) with
        ``np.linspace(warmup_teacher_temp, teacher_temp, warmup)`` (``dinov2/utils/utils.py``
        ``CosineScheduler``): its last warm-up step is already at ``teacher_temp``."""
        hp = self.hparams
        warmup = round(self.run_epochs(hp.warmup_teacher_temp_epochs) * self.steps_per_epoch())
        if self.global_step >= warmup:
            return hp.teacher_temp
        progress = self.global_step / max(warmup - 1, 1)  # a 1-step linspace is its start
        return hp.warmup_teacher_temp + (hp.teacher_temp - hp.warmup_teacher_temp) * progress

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)  # the EMA teacher and the CLS centre
        self.update_center(self.patch_center, self._patch_means)

    def on_after_backward(self) -> None:
        """Unlike DINO, keep the last layers' gradients while they are frozen: DINOv2 freezes them
        with a zero lr (:meth:`on_train_batch_start`), so they still count in the heads' clipping norms
        and still move AdamW's moments."""

    def lr_group(self, name: str, param: nn.Parameter) -> str:
        # dinov2/utils/param_groups.py: every "last_layer" parameter (both heads') is in a group of its own.
        return "last_layer" if ".last_layer." in name else ""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """The scheduled lr, except the last layers' lr: 0 for the first ``freeze_last_layer_epochs``
        epochs (``dinov2/train/train.py``'s ``last_layer_lr_schedule``)."""
        super().on_train_batch_start(batch, batch_idx)
        if self.global_step < self.hparams.freeze_last_layer_epochs * self.steps_per_epoch():
            for group in self.optimizers().optimizer.param_groups:
                if group.get("lr_group") == "last_layer":
                    group["lr"] = 0.0

    def gradient_clip_groups(self) -> list[list[nn.Parameter]]:
        # DINOv2 clips the global norm of each module on its own: the backbone, each head.
        modules = [[*self.encoder.parameters(), self.mask_token], [*self.head.parameters()]]
        if self.hparams.ibot_separate_head:
            modules.append([*self.ibot_head.parameters()])
        return modules

    def lr_scale(self, name: str, param: nn.Parameter) -> float:
        """``dinov2/utils/param_groups.py``: layer-wise decay 0.9^(depth + 1 - layer) with layer 0
        the patch and position embeddings, the CLS, register and mask tokens, block i at i + 1,
        everything else (the final norm, the heads) at depth + 1; the patch embedding at a further
        0.2."""
        if not name.startswith(("encoder.", "mask_token")):
            return 1.0
        depth = len(self.encoder.vit.blocks)
        local = name.removeprefix("encoder.vit.")
        if local.startswith("blocks."):
            layer = int(local.split(".")[1]) + 1
        elif local.startswith(("patch_embed", "pos_embed", "cls_token", "reg_token", "mask_token")):
            layer = 0
        else:
            layer = depth + 1
        scale = self.hparams.layer_decay ** (depth + 1 - layer)
        return scale * self.hparams.patch_embed_lr_mult if local.startswith("patch_embed") else scale
