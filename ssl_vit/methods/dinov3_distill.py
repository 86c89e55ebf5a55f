"""DINOv3's distillation (Siméoni et al., 2025), following facebookresearch/dinov3
``dinov3/train/multidist_meta_arch.py`` and ``configs/ssl_default_config.yaml``.

A frozen teacher, an ssl-vit DINO or DINOv2 checkpoint with its heads, teaches a ViT student that
has heads of its own the DINOv2 losses (:mod:`ssl_vit.methods.dinov2`): the student's CLS
distributions of every crop against the teacher's of the other global crops, its masked patches
against the teacher's patch distributions there (iBOT), and KoLeo on its CLS tokens. As in
``MultiDistillationMetaArch``: the teacher is not an EMA of the student and never changes, its
targets are always Sinkhorn-Knopp-balanced, and the student's iBOT head is always its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from ssl_vit.checkpoint import objective_name, read_checkpoint
from ssl_vit.encoder import EncoderConfig, ViTEncoder
from ssl_vit.errors import UserError
from ssl_vit.heads import DINOHead
from ssl_vit.methods.dinov2 import DINOv2

#: The objectives whose checkpoints hold a teacher with DINO heads, and the iBOT loss weight their
#: heads support by default: a DINO teacher has no patch-level head, so no iBOT targets.
TEACHER_OBJECTIVES = {"DINOv2": 1.0, "DINO": 0.0}


class DINOv3Distill(DINOv2):
    """DINOv3's distillation of a frozen teacher into a smaller ViT.

    DINO + iBOT + KoLeo distillation of the frozen ``teacher`` (an ssl-vit DINO or DINOv2
    ``.ckpt``: its EMA teacher encoder and heads) into the student ViT ``encoder``, whose DINO and
    iBOT heads have the teacher's sizes. Defaults are DINOv3's ``ssl_default_config.yaml`` (as
    DINOv2's, but lr 1e-3 x sqrt(batch / 1024)); the teacher's patch grid must be the student's,
    since iBOT compares them patch by patch.

    Args:
        teacher: the teacher checkpoint.
        teacher_made_by: the command that makes a missing teacher, named when it is missing.
        encoder: the student ViT.
        ibot_loss_weight: None for 1.0 with a DINOv2 teacher and 0 (no iBOT term) with a DINO one.
    """

    encoders: ClassVar[dict[str, str]] = {"student": "encoder"}
    eval_mode_modules = ("teacher_encoder", "teacher_head", "teacher_ibot_head")

    def __init__(
        self,
        teacher: str,
        encoder: EncoderConfig,
        teacher_made_by: str | None = None,
        mask_ratio_range: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        ibot_loss_weight: float | None = None,
        koleo_loss_weight: float = 0.1,
        freeze_last_layer_epochs: int = 1,
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        warmup_teacher_temp_epochs: int = 30,
        clip_grad: float = 3.0,
        base_lr: float = 1e-3,
        layer_decay: float = 0.9,
        patch_embed_lr_mult: float = 0.2,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        warmup_epochs: float = 10,
        min_lr: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        scale_to_run: bool = True,
    ) -> None:
        ckpt = read_teacher(teacher, teacher_made_by)
        objective, hp = objective_name(ckpt), ckpt["hyper_parameters"]
        if ibot_loss_weight is None:
            ibot_loss_weight = TEACHER_OBJECTIVES[objective]
        elif ibot_loss_weight > 0 and objective == "DINO":
            raise UserError(
                f"teacher {teacher} is a DINO checkpoint, which has no patch-level (iBOT) head; "
                "leave model.init_args.ibot_loss_weight unset (0 for a DINO teacher) or use a DINOv2 teacher"
            )
        dino_sizes = {k: hp[k] for k in ("out_dim", "hidden_dim", "bottleneck_dim")}
        # The teacher's patch-level head: DINOv2's own iBOT head where it has one, else its DINO head.
        shared = not hp.get("ibot_separate_head", False)
        ibot_sizes = dino_sizes if shared else {k: hp[f"ibot_{k}"] for k in dino_sizes}
        super().__init__(
            encoder,
            **dino_sizes,
            ibot_separate_head=True,
            **{f"ibot_{k}": v for k, v in ibot_sizes.items()},
            mask_ratio_range=mask_ratio_range,
            mask_probability=mask_probability,
            ibot_loss_weight=ibot_loss_weight,
            koleo_loss_weight=koleo_loss_weight,
            freeze_last_layer_epochs=freeze_last_layer_epochs,
            student_temp=student_temp,
            warmup_teacher_temp=warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            centering="sinkhorn_knopp",
            clip_grad=clip_grad,
            base_lr=base_lr,
            layer_decay=layer_decay,
            patch_embed_lr_mult=patch_embed_lr_mult,
            weight_decay=weight_decay,
            weight_decay_end=weight_decay_end,
            warmup_epochs=warmup_epochs,
            min_lr=min_lr,
            betas=betas,
            scale_to_run=scale_to_run,
        )
        self.ema_targets = {}  # the teacher is trained already: nothing follows the student
        # What DINOv2's methods read from the hyperparameters, which a recipe's LightningCLI fills
        # with this class's own arguments only.
        self.hparams.update(
            centering="sinkhorn_knopp",
            ibot_separate_head=True,
            ibot_loss_weight=ibot_loss_weight,
            **dino_sizes,
            **{f"ibot_{k}": v for k, v in ibot_sizes.items()},
        )
        # The teacher's modules replace the EMA copies of the student that DINOv2 built.
        teacher_config = {**hp["encoder"], "drop_path_rate": 0.0}
        self.teacher_encoder = ViTEncoder(**teacher_config)
        if self.teacher_encoder.patch_size != self.encoder.patch_size:
            raise UserError(
                f"teacher {teacher} has {self.teacher_encoder.patch_size}-px patches, the student "
                f"{self.encoder.patch_size}-px; iBOT compares them patch by patch: give the student "
                f"patch_size {self.teacher_encoder.patch_size}"
            )
        in_dim = self.teacher_encoder.embed_dim
        norm_last_layer = hp.get("norm_last_layer", False)
        self.teacher_head = DINOHead(
            in_dim, **dino_sizes, norm_last_layer=norm_last_layer, use_bn=hp.get("use_bn_in_head", False)
        )
        self.teacher_ibot_head = (
            self.teacher_head if shared else DINOHead(in_dim, **ibot_sizes, norm_last_layer=norm_last_layer)
        )
        state = ckpt["state_dict"]
        for name in ("teacher_encoder", "teacher_head") + (() if shared else ("teacher_ibot_head",)):
            prefix = f"{name}."
            self.get_submodule(name).load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
        for module in (self.teacher_encoder, self.teacher_head, self.teacher_ibot_head):
            module.requires_grad_(False).eval()
        self.hparams["teacher_objective"] = objective


def read_teacher(source: str, made_by: str | None = None) -> dict[str, Any]:
    """The teacher checkpoint, or one line saying why it cannot teach."""
    path = Path(source)
    if made_by and not path.exists():
        raise UserError(
            f"teacher {source} not found: run `{made_by}` first, or give a teacher trained on other images "
            "(--model.init_args.teacher PATH)"
        )
    if not path.is_file():
        raise UserError(
            f"teacher {source} is not a checkpoint file; pass a DINO or DINOv2 .ckpt from `ssl-vit pretrain` "
            "(e.g. runs/shapes/dinov2/checkpoints/last.ckpt)"
        )
    ckpt = read_checkpoint(path)
    objective = objective_name(ckpt)
    if objective not in TEACHER_OBJECTIVES:
        raise UserError(
            f"teacher {source} was trained with {objective}; DINOv3's distillation needs a teacher with DINO heads "
            "(a DINO or DINOv2 checkpoint); `ssl-vit distill` with its default loss takes any teacher"
        )
    return ckpt
