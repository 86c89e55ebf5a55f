"""SimMIM (Xie et al., 2022), following microsoft/SimMIM ``simmim.py``.

The encoder sees every position, masked patches replaced by a learnable mask token; a one-layer
linear decoder (1x1 convolution to each patch's pixels, then pixel shuffle) predicts raw pixels,
and the L1 loss counts masked pixels only.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ssl_vit.encoder import EncoderConfig
from ssl_vit.errors import UserError
from ssl_vit.losses import masked_pixel_l1
from ssl_vit.masking import block_patch_mask, patch_mask_to_pixels
from ssl_vit.methods.base import SSLMethod
from ssl_vit.pictures import reconstruction_columns
from ssl_vit.schedules import PaperRun


class SimMIMOutput(NamedTuple):
    loss: Tensor
    pred: Tensor  # (B, C, H, W) reconstructed pixels
    mask: Tensor  # (B, h, w) bool over the patch grid, True = masked


class SimMIM(SSLMethod):
    """SimMIM pretraining (Xie et al., 2022).

    Defaults are the paper's ViT-B settings: mask 60% in 32-px blocks,
    SimMIM's ViT as far as timm's has it (layer scale 0.1, its initialisation), AdamW (0.9, 0.999),
    base lr 1e-4, warm-up from 5e-7 over 10 epochs and cosine to 5e-6, all three scaled by global
    batch / 512, wd 0.05, gradient norm clipped at 5.0."""

    #: the 100-epoch configs (10 warm-up), batch 2048
    paper_run = PaperRun(epochs=100, steps_per_epoch=1281167 // 2048)

    lr_batch_divisor: ClassVar[int] = 512
    lr_bounds_scale_with_batch: ClassVar[bool] = True
    schedule_step_offset: ClassVar[int] = -1  # main_simmim.py: step_update(idx) after optimizer.step()
    # SimMIM never trains the CLS token: its features (evaluated and exported) are the mean of the
    # patch tokens after the final norm (timm's "avg" pooling, without moving the norm after it).
    encoder_defaults: ClassVar[dict[str, Any]] = {"init_values": 0.1, "global_pool": "avg", "fc_norm": False}

    def __init__(
        self,
        encoder: EncoderConfig,
        mask_ratio: float = 0.6,
        mask_patch_size: int = 32,
        clip_grad: float = 5.0,
        base_lr: float = 1e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 10,
        warmup_lr: float = 5e-7,
        min_lr: float = 5e-6,
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
            warmup_lr=warmup_lr,
            scale_to_run=scale_to_run,
        )
        if not 0 < mask_ratio < 1:
            raise UserError(f"model.mask_ratio must be in (0, 1), got {mask_ratio}")
        p, (h, w) = self.encoder.patch_size, self.encoder.grid_size
        if mask_patch_size % p or h % (mask_patch_size // p) or w % (mask_patch_size // p):
            raise UserError(
                f"model.mask_patch_size {mask_patch_size} must be a multiple of the patch size {p} whose blocks tile "
                f"the {h}x{w} patch grid"
            )
        self.mask_ratio = mask_ratio
        self.mask_patch_size = mask_patch_size
        dim, channels = self.encoder.embed_dim, self.encoder.vit.patch_embed.proj.in_channels
        _init_simmim_vit(self.encoder.vit)
        # (1, 1, D) and truncated at one std, as VisionTransformerForSimMIM's; decayed like it.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        _simmim_trunc_normal_(self.mask_token)
        self.decoder = nn.Sequential(nn.Conv2d(dim, p * p * channels, kernel_size=1), nn.PixelShuffle(p))

    def forward(self, images: Tensor) -> SimMIMOutput:
        b = images.shape[0]
        p, (h, w) = self.encoder.patch_size, self.encoder.grid_size
        mask = block_patch_mask(b, (h, w), p, self.mask_patch_size, self.mask_ratio, images.device)
        patches = self.encoder(images, mask=mask, mask_token=self.mask_token).patches  # (B, h*w, D)
        pred = self.decoder(patches.transpose(1, 2).reshape(b, -1, h, w))
        pixel_mask = patch_mask_to_pixels(mask, p).type_as(images)
        return SimMIMOutput(masked_pixel_l1(pred, images, pixel_mask), pred, mask)

    def decays(self, name: str, param: nn.Parameter) -> bool:
        # get_pretrain_param_groups: also no decay for the encoder's no_weight_decay() (pos_embed, cls_token).
        return super().decays(name, param) and name not in ("encoder.vit.pos_embed", "encoder.vit.cls_token")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, _ = batch
        loss = self(images).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def pictures(self, images: Tensor) -> dict[str, list[Tensor]]:
        out = self(images)
        pixel_mask = patch_mask_to_pixels(out.mask, self.encoder.patch_size).type_as(images)
        return {**super().pictures(images), "reconstruction": reconstruction_columns(images, out.pred, pixel_mask)}


def _simmim_trunc_normal_(tensor: Tensor) -> None:
    # VisionTransformerForSimMIM._trunc_normal_ cuts at one std, and its base class calls it for
    # every initialiser, not only the mask token's.
    trunc_normal_(tensor, std=0.02, a=-0.02, b=0.02)


def _init_simmim_vit(vit: nn.Module) -> None:
    """SimMIM's ViT initialisation: truncated-normal (std 0.02, within +-0.02) linear and
    convolution weights, CLS token and position embedding, zero biases, unit LayerNorms, then each
    block's output projections divided by sqrt(2 x depth)."""
    for m in vit.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            _simmim_trunc_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for token in (vit.cls_token, vit.pos_embed):
        if token is not None:
            _simmim_trunc_normal_(token)
    vit.fix_init_weight()
