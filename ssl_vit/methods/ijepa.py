"""I-JEPA (Assran et al., 2023), following facebookresearch/ijepa ``src/train.py``.

A context encoder sees one large block of the image; a narrow predictor, given the context tokens
and the positions of four target blocks, predicts the representations an EMA target encoder
gives those blocks from the whole image (layer-normed over features); the loss is the smooth L1
distance. No augmentation but a random resized crop, no CLS token, no pixel targets.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_vit.encoder import EncoderConfig, gather_tokens, sincos_pos_embed_2d
from ssl_vit.errors import UserError
from ssl_vit.heads import layer_norm_1e6, transformer_blocks
from ssl_vit.masking import ContextTargetMasks, check_ijepa_block_sizes, ijepa_multiblock_masks
from ssl_vit.methods.base import SSLMethod
from ssl_vit.pictures import context_target_columns
from ssl_vit.schedules import PaperRun


class IJEPAOutput(NamedTuple):
    loss: Tensor
    pred: Tensor  # (T * B, Kt, D) predicted target-block tokens, block-major
    target: Tensor  # (T * B, Kt, D) the target encoder's layer-normed tokens there
    masks: ContextTargetMasks


class IJEPAPredictor(nn.Module):
    """``VisionTransformerPredictor``: the context tokens, embedded to the predictor's width, with
    fixed sin-cos positions; then, for each target block, one shared mask token per target patch
    plus that patch's position, appended to the context; blocks, norm, and a projection of the
    mask tokens back to the encoder's width. Each target block is predicted in its own sequence,
    so the blocks never see one another."""

    def __init__(self, embed_dim: int, dim: int, depth: int, num_heads: int, grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_pos_embed_2d(dim, grid_size, num_prefix_tokens=0).unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = transformer_blocks(dim, depth, num_heads)
        self.norm = layer_norm_1e6(dim)
        self.proj = nn.Linear(dim, embed_dim)

    def forward(self, context: Tensor, context_idx: Tensor, target_idx: Tensor) -> Tensor:
        """context: (B, Kc, D) encoder tokens at patches ``context_idx`` (B, Kc); target_idx:
        (T, B, Kt). Returns (T * B, Kt, D) predictions, block-major (block 0 of every sample first)."""
        pos = self.pos_embed.expand(context.shape[0], -1, -1)
        x = self.embed(context) + gather_tokens(pos, context_idx)
        queries = self.mask_token + torch.cat([gather_tokens(pos, idx) for idx in target_idx])
        x = torch.cat([x.repeat(len(target_idx), 1, 1), queries], dim=1)
        x = self.norm(self.blocks(x))
        return self.proj(x[:, context.shape[1] :])


class IJEPA(SSLMethod):
    """I-JEPA pretraining (Assran et al., 2023).

    Defaults are ``configs/in1k_vith14_ep300.yaml``'s: 4 target blocks of
    scale 0.15-0.2 and aspect ratio 0.75-1.5, a context block of scale 0.85-1 without them, at
    least ``min_keep`` = 10 patches; a predictor 384 wide and 12 deep with the encoder's heads;
    target momentum 0.996 -> 1 (linear, at any run length); AdamW with the lr warming up from ``warmup_lr`` 2e-4 to
    ``base_lr`` 1e-3 over 40 epochs, then cosine to ``min_lr`` 1e-6, weight decay 0.04 -> 0.4
    (cosine). The paper's lr is for batch 2048; another batch scales all three lrs by
    sqrt(batch / 2048). The encoder has no CLS token and fixed sin-cos positions; the target
    encoder is the one evaluated and exported, on its mean-pooled patch tokens."""

    #: in1k_vith14_ep300.yaml: 300 epochs (40 warm-up) at batch 128 x 16 GPUs
    paper_run = PaperRun(epochs=300, steps_per_epoch=1281167 // 2048)
    encoders: ClassVar[dict[str, str]] = {"target": "target_encoder", "context": "encoder"}
    ema_targets: ClassVar[dict[str, str]] = {"target_encoder": "encoder"}
    # No CLS token; timm then pools the patch tokens after the per-token final norm (no fc_norm).
    encoder_defaults: ClassVar[dict[str, Any]] = {"class_token": False, "global_pool": "avg", "fc_norm": False}
    lr_batch_divisor: ClassVar[int] = 2048
    lr_batch_rule: ClassVar[Literal["linear", "sqrt"]] = "sqrt"
    lr_bounds_scale_with_batch: ClassVar[bool] = True
    schedule_step_offset: ClassVar[int] = 1

    def __init__(
        self,
        encoder: EncoderConfig,
        predictor_dim: int = 384,
        predictor_depth: int = 12,
        num_targets: int = 4,
        target_scale: tuple[float, float] = (0.15, 0.2),
        target_aspect_ratio: tuple[float, float] = (0.75, 1.5),
        context_scale: tuple[float, float] = (0.85, 1.0),
        min_keep: int = 10,
        allow_overlap: bool = False,
        target_momentum: float = 0.996,
        base_lr: float = 1e-3,
        warmup_lr: float = 2e-4,
        min_lr: float = 1e-6,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        warmup_epochs: float = 40,
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
            warmup_lr=warmup_lr,
            scale_to_run=scale_to_run,
        )
        enc = self.encoder
        if enc.has_class_token or enc.num_prefix_tokens:
            raise UserError("I-JEPA's encoder has no CLS or register tokens; drop class_token and reg_tokens")
        num_heads = enc.vit.blocks[0].attn.num_heads
        if predictor_dim % num_heads:
            raise UserError(
                f"model.predictor_dim {predictor_dim} must be divisible by the encoder's {num_heads} heads "
                "(the predictor uses the encoder's head count)"
            )
        check_ijepa_block_sizes(enc.grid_size, target_scale, target_aspect_ratio, context_scale, min_keep)
        enc.fix_sincos_pos_embed()
        self.predictor = IJEPAPredictor(enc.embed_dim, predictor_dim, predictor_depth, num_heads, enc.grid_size)
        # src/helper.py init_model over the ViTs' own init: every Linear and the patch embedding
        # trunc-normal with zero bias (which also undoes the ViT's residual rescaling), the mask token too;
        # std 0.02 at the paper's widths, more for narrower layers (ijepa_init_std).
        encoder_std = ijepa_init_std(enc.embed_dim, PAPER_ENCODER_WIDTH)
        predictor_std = ijepa_init_std(predictor_dim, PAPER_PREDICTOR_WIDTH)
        enc.apply(partial(_init_ijepa_weights, std=encoder_std))
        self.predictor.apply(partial(_init_ijepa_weights, std=predictor_std))
        nn.init.trunc_normal_(self.predictor.mask_token, std=predictor_std)
        patch_embed = enc.vit.patch_embed.proj.weight
        nn.init.trunc_normal_(patch_embed, std=ijepa_init_std(patch_embed[0].numel(), PAPER_PATCH_PIXELS))
        self.target_encoder = self.ema_encoder_copy()

    def sample_masks(self, batch_size: int, device: torch.device) -> ContextTargetMasks:
        hp = self.hparams
        return ijepa_multiblock_masks(
            batch_size,
            self.encoder.grid_size,
            hp.num_targets,
            hp.target_scale,
            hp.target_aspect_ratio,
            hp.context_scale,
            hp.min_keep,
            hp.allow_overlap,
            device=device,
        )

    def forward(self, images: Tensor, masks: ContextTargetMasks | None = None) -> IJEPAOutput:
        if masks is None:
            masks = self.sample_masks(images.shape[0], images.device)
        with torch.no_grad():
            tokens = self.target_encoder(images).patches
            tokens = F.layer_norm(tokens, tokens.shape[-1:])
            target = torch.cat([gather_tokens(tokens, idx) for idx in masks.target_idx])
        context = self.encoder(images, keep_idx=masks.context_idx).patches
        pred = self.predictor(context, masks.context_idx, masks.target_idx)
        return IJEPAOutput(F.smooth_l1_loss(pred, target), pred, target, masks)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, _ = batch
        out = self(images)
        self.watch_collapse(out.target.unflatten(0, (len(out.masks.target_idx), -1)).mean(dim=(0, 2)))
        self.log("train/loss", out.loss, prog_bar=True)
        return out.loss

    def ema_momentum(self, step: int) -> float:
        # train.py: after update k, m_k = ema[0] + k (ema[1] - ema[0]) / total: linear, not cosine.
        # The paper's momentum at any run length, not run_momentum's: I-JEPA has no loss term that
        # resists collapse (no negatives, centring or balancing), only a target that moves slowly.
        # A short run's scaled window (10 steps) let the target follow the encoder, and the features
        # collapsed on real digits (benchmarks/results/README.md, "I-JEPA's target momentum").
        start = self.hparams.target_momentum
        return start + (1.0 - start) * step / int(self.trainer.estimated_stepping_batches)

    def pictures(self, images: Tensor) -> dict[str, list[Tensor]]:
        masks = self.sample_masks(images.shape[0], images.device)
        blocks = context_target_columns(images, masks.context_idx, masks.target_idx, self.encoder.patch_size)
        return {**super().pictures(images), "blocks": blocks}


#: The narrowest of the paper's models, for which src/helper.py's trunc-normal(0.02) was chosen:
#: the ViT-B/16 encoder, the 14 x 14 x 3 pixels of ViT-H/14's patches, the 384-wide predictors.
PAPER_ENCODER_WIDTH, PAPER_PATCH_PIXELS, PAPER_PREDICTOR_WIDTH = 768, 3 * 14 * 14, 384


def ijepa_init_std(fan_in: int, paper_fan_in: int) -> float:
    """The official init's std, 0.02, for a layer as wide as the paper's or wider; a narrower
    layer keeps the gain (std x sqrt(fan-in)) it has at the paper's width.

    A fixed 0.02 shrinks every layer's output with its width: at the quickstart's 4-px patches a
    fresh token's image content has 0.27x the spread of its fixed sin-cos position (1.03x with
    16-px patches, 1.2x under this rule), so the fresh encoder's tokens are mostly their positions
    (docs/recipes-and-data.md, I-JEPA)."""
    return 0.02 * math.sqrt(max(1.0, paper_fan_in / fan_in))


def _init_ijepa_weights(m: nn.Module, std: float) -> None:
    if isinstance(m, nn.Linear | nn.Conv2d):
        nn.init.trunc_normal_(m.weight, std=std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
