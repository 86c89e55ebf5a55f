"""Masked Autoencoders (He et al., 2021), following facebookresearch/mae ``models_mae.py``.

The encoder sees only the visible 25% of patches; a lightweight decoder gets the encoded visible
tokens plus a shared mask token at every masked position and predicts the masked patches' pixels.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ssl_vit.encoder import EncoderConfig, gather_tokens, sincos_pos_embed_2d
from ssl_vit.errors import UserError
from ssl_vit.heads import layer_norm_1e6, transformer_blocks
from ssl_vit.losses import masked_patch_mse, normalized_patch_targets
from ssl_vit.masking import PatchMask, patch_mask_to_pixels, random_patch_mask
from ssl_vit.methods.base import SSLMethod
from ssl_vit.patches import patchify, unpatchify
from ssl_vit.pictures import reconstruction_columns
from ssl_vit.schedules import PaperRun


class MAEOutput(NamedTuple):
    loss: Tensor
    pred: Tensor  # (B, N, p*p*C) predicted pixels of every patch (normalised if norm_pix_loss)
    mask: PatchMask


class MAEDecoder(nn.Module):
    """Embed visible tokens, scatter them among mask tokens, add fixed sin-cos positions, and
    predict every patch's pixels."""

    def __init__(
        self,
        embed_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        grid_size: tuple[int, int],
        num_prefix_tokens: int,
        patch_pixels: int,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_pos_embed_2d(dim, grid_size, num_prefix_tokens).unsqueeze(0)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        self.blocks = transformer_blocks(dim, depth, num_heads)
        self.norm = layer_norm_1e6(dim)
        self.pred = nn.Linear(dim, patch_pixels)

    def forward(self, tokens: Tensor, restore_idx: Tensor) -> Tensor:
        x = self.embed(tokens)
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        b, n = restore_idx.shape
        masked = self.mask_token.expand(b, n - visible.shape[1], -1)
        patches = torch.cat([visible, masked], dim=1)
        patches = gather_tokens(patches, restore_idx)
        x = torch.cat([prefix, patches], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.num_prefix_tokens :])


class MAE(SSLMethod):
    """MAE pretraining (He et al., 2022).

    Defaults are the paper's ViT-B/16 settings (mask 75%, decoder 512-d x 8
    blocks, normalised-pixel targets, AdamW betas (0.9, 0.95), base lr 1.5e-4, wd 0.05,
    40 warm-up epochs)."""

    #: main_pretrain.py: 400 epochs (40 warm-up) at batch 4096
    paper_run = PaperRun(epochs=400, steps_per_epoch=1281167 // 4096)

    def __init__(
        self,
        encoder: EncoderConfig,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        warmup_epochs: float = 40,
        min_lr: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
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
            scale_to_run=scale_to_run,
        )
        if not 0 < mask_ratio < 1:
            raise UserError(f"model.mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        enc = self.encoder
        self.encoder.fix_sincos_pos_embed()
        self.decoder = MAEDecoder(
            enc.embed_dim,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            enc.grid_size,
            enc.num_prefix_tokens,
            patch_pixels=enc.patch_size**2 * enc.vit.patch_embed.proj.in_channels,
        )
        self.apply(_init_mae_weights)
        proj = enc.vit.patch_embed.proj.weight  # initialised like a Linear layer, as in MAE
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        for token in (enc.vit.cls_token, self.decoder.mask_token):
            if token is not None:
                nn.init.normal_(token, std=0.02)

    def forward(self, images: Tensor) -> MAEOutput:
        mask = random_patch_mask(images.shape[0], self.encoder.num_patches, self.mask_ratio, images.device)
        latent = self.encoder(images, keep_idx=mask.keep_idx)
        pred = self.decoder(latent.tokens, mask.restore_idx)
        target = patchify(images, self.encoder.patch_size)
        if self.norm_pix_loss:
            target = normalized_patch_targets(target)
        return MAEOutput(masked_patch_mse(pred, target, mask.mask), pred, mask)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, _ = batch
        loss = self(images).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def pictures(self, images: Tensor) -> dict[str, list[Tensor]]:
        out = self(images)
        p, grid = self.encoder.patch_size, self.encoder.grid_size
        pred = out.pred
        if self.norm_pix_loss:  # predictions are per-patch normalised pixels: undo with each patch's own statistics
            target = patchify(images, p)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        pixel_mask = patch_mask_to_pixels(out.mask.mask.reshape(-1, *grid), p)
        reconstruction = reconstruction_columns(images, unpatchify(pred, p, grid), pixel_mask)
        return {**super().pictures(images), "reconstruction": reconstruction}


def _init_mae_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
