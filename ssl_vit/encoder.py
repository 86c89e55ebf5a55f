"""The one ViT encoder every objective trains: a timm ViT plus the token plumbing that
self-supervised objectives need (visible-token subsets, mask tokens, other resolutions).

The timm ViT is a ``VisionTransformer`` (learned or fixed position embeddings) or an ``Eva``: the
class of timm's RoPE ViTs, among them DINOv3's own architecture (``vit_small_patch16_dinov3``...:
rotary positions, storage tokens, layer scale).

The timm model is kept as it is (``ViTEncoder.vit``) so that its state dict is a plain timm state dict.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import timm
import torch
from timm.layers import DropPath
from timm.models import checkpoint_seq
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from typing_extensions import TypedDict

from ssl_vit.errors import UserError


class EncoderConfig(TypedDict, total=False):
    """A timm ViT name plus the architecture arguments to override (as in a recipe's ``encoder:``)."""

    name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    qkv_bias: bool
    drop_path_rate: float
    drop_path_uniform: bool  # drop_path_rate in every block (DINOv2), not timm's ramp from 0 to it
    class_token: bool
    pre_norm: bool  # a LayerNorm before the blocks (CLIP's ln_pre)
    global_pool: str
    fc_norm: bool
    reg_tokens: int
    num_reg_tokens: int  # Eva's name for reg_tokens (DINOv3's storage tokens)
    rope_rescale_coords: float  # DINOv3's RoPE coordinate augmentation in training (Eva)
    rope_shift_coords: float
    rope_jitter_coords: float
    weight_init: str
    init_values: float | None  # layer scale; None turns off a default such as DINOv2's 1e-5
    grad_checkpointing: bool
    pos_embed_resample: Literal["timm", "dino"]


#: The timm classes the encoder wraps: timm's ViT and its RoPE ViTs (``Eva``).
TIMM_VITS = (VisionTransformer, Eva)
TimmViT = VisionTransformer | Eva

#: Encoder settings that are ssl-vit's, not timm's: left out of an export's timm model arguments.
NON_TIMM_SETTINGS = ("name", "grad_checkpointing", "pos_embed_resample", "drop_path_uniform")


NO_CLASS_TOKEN = (
    "this encoder has no CLS token (I-JEPA trains none): evaluate its mean-pooled patch tokens (pooling: mean)"
)


class EncoderOutput(NamedTuple):
    """All tokens after the final norm; prefix (CLS, register) tokens first."""

    tokens: Tensor
    num_prefix_tokens: int
    has_class_token: bool = True

    @property
    def cls(self) -> Tensor:
        if not self.has_class_token:
            raise UserError(NO_CLASS_TOKEN)
        return self.tokens[:, 0]

    @property
    def patches(self) -> Tensor:
        return self.tokens[:, self.num_prefix_tokens :]


class ViTProperties:
    """What the evaluators and objectives read off an encoder's timm ViT (``vit``)."""

    vit: TimmViT

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    @property
    def has_class_token(self) -> bool:
        return self.vit.cls_token is not None

    @property
    def image_size(self) -> int:
        """The native resolution: the evaluators' default crop."""
        return self.vit.patch_embed.img_size[0]

    @property
    def num_heads(self) -> int:
        """The last block's attention heads (the attentive probe takes as many)."""
        return self.vit.blocks[-1].attn.num_heads

    def pooled_and_map(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """timm's pooled embedding (``forward_head(pre_logits=True)``: the CLS token, or the mean
        of the patch tokens for ``global_pool: avg``) and the patch tokens as a map, (B, D, h, w)."""
        tokens = self(images).tokens
        pooled = self.vit.forward_head(tokens, pre_logits=True)
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        patches = tokens[:, self.vit.num_prefix_tokens :]
        return pooled, patches.transpose(1, 2).reshape(len(images), -1, h, w)


class ViTEncoder(ViTProperties, nn.Module):
    """A timm ViT whose forward can drop or mask patch tokens and take any input resolution.

    Position embeddings are resampled to the input's patch grid, so one encoder serves 224-px
    global crops and 96-px local crops alike: with timm's antialiased bicubic resampling
    (``pos_embed_resample: timm``, timm's ``dynamic_img_size``) or as DINO and DINOv2 do
    (``dino``: bicubic without antialiasing, at DINO's scale factor). A RoPE ViT (``Eva``) has
    nothing to resample: its rotary positions are computed for each grid, as in DINOv3's code. ``grad_checkpointing``
    recomputes each block's activations in the backward pass instead of storing them (timm's
    ``set_grad_checkpointing``): less memory for a larger batch or model, about a third more compute.
    ``drop_path_uniform`` drops every block's residual branches at ``drop_path_rate`` (DINOv2's
    ``drop_path_uniform``) where timm ramps the rate linearly from 0 in the first block.
    """

    def __init__(
        self,
        name: str = "vit_base_patch16_224",
        grad_checkpointing: bool = False,
        pos_embed_resample: Literal["timm", "dino"] = "timm",
        drop_path_uniform: bool = False,
        **overrides,
    ) -> None:
        super().__init__()
        if pos_embed_resample not in ("timm", "dino"):
            raise UserError(f"model.encoder.pos_embed_resample must be timm or dino, got {pos_embed_resample!r}")
        if not timm.is_model(name):
            raise UserError(f"unknown timm model {name!r}; use a ViT name such as vit_small_patch16_224")
        try:
            vit = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **overrides)
        except (RuntimeError, TypeError) as err:
            raise UserError(f"cannot build encoder {name!r} with {overrides}: {err}") from err
        if not isinstance(vit, TIMM_VITS):
            raise UserError(
                f"encoder {name!r} is a {type(vit).__name__}; ssl-vit needs a timm ViT "
                "(VisionTransformer, or Eva for RoPE ViTs such as vit_small_patch16_dinov3)"
            )
        img, patch = vit.patch_embed.img_size, vit.patch_embed.patch_size
        if img[0] % patch[0] or img[1] % patch[1]:
            raise UserError(
                f"model.encoder.patch_size {patch[0]}x{patch[1]} does not divide img_size {img[0]}x{img[1]}; "
                "use an img_size that is a multiple of the patch size"
            )
        if "init_values" in overrides and overrides["init_values"] is None and has_layer_scale(vit):
            # timm drops arguments given as None, so the architecture's own layer scale would stay
            raise UserError(
                f"model.encoder.init_values null cannot turn off {name}'s layer scale (timm keeps its default); "
                "give a value instead (1.0: the blocks at full strength from the first step)"
            )
        vit.set_grad_checkpointing(grad_checkpointing)
        rate = overrides.get("drop_path_rate", 0.0)
        if drop_path_uniform and rate > 0:
            for block in vit.blocks:
                block.drop_path1, block.drop_path2 = DropPath(rate), DropPath(rate)
        self.name = name
        self.pos_embed_resample = pos_embed_resample
        self.vit = vit

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.vit.patch_embed.num_patches

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    def no_weight_decay(self) -> set[str]:
        return self.vit.no_weight_decay()

    def fix_sincos_pos_embed(self) -> None:
        """Replace the learned position embedding by a frozen 2-D sin-cos one (MAE, MoCo v3)."""
        if self.vit.pos_embed is None:
            raise UserError(
                f"this objective fixes a sin-cos position embedding, and {self.name} has none (RoPE positions): "
                "use a ViT with a position embedding, such as vit_small_patch16_224"
            )
        pos = sincos_pos_embed_2d(self.embed_dim, self.grid_size, self.vit.num_prefix_tokens)
        self.vit.pos_embed.data.copy_(pos.unsqueeze(0))
        self.vit.pos_embed.requires_grad_(False)

    def forward(
        self,
        images: Tensor,
        keep_idx: Tensor | None = None,
        mask: Tensor | None = None,
        mask_token: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode a batch of images.

        images: (B, C, H, W), any H, W divisible by the patch size.
        keep_idx: (B, K) indices of the patches each sample keeps; the others never enter the
            transformer (MAE). Applied after position embeddings, so kept tokens keep their position.
        mask, mask_token: (B, N) bool/0-1 mask over patches and a learnable token of D values that replaces
            the embeddings of masked patches before position embeddings are added (SimMIM).
        """
        x = self.vit.patch_embed(images)  # (B, h, w, D): dynamic_img_size keeps the grid
        if mask is not None:
            w = mask.reshape(x.shape[:-1]).unsqueeze(-1).type_as(x)
            x = x * (1 - w) + mask_token.reshape(-1).to(x.dtype) * w
        x, rope = self._pos_embed(x)  # prefix tokens + patches; positions for this grid
        n_prefix = self.vit.num_prefix_tokens
        if keep_idx is not None:
            x = torch.cat([x[:, :n_prefix], gather_tokens(x[:, n_prefix:], keep_idx)], dim=1)
            if rope is not None:  # (N, d) per patch -> (B, 1, K, d): each sample's kept patches, all heads
                rope = rope[keep_idx].unsqueeze(1)
        x = self.vit.norm_pre(x)
        checkpointed = self.vit.grad_checkpointing and torch.is_grad_enabled()
        if rope is None:
            x = checkpoint_seq(self.vit.blocks, x) if checkpointed else self.vit.blocks(x)
        else:
            for block in self.vit.blocks:
                x = checkpoint(block, x, rope=rope, use_reentrant=False) if checkpointed else block(x, rope=rope)
        return EncoderOutput(self.vit.norm(x), n_prefix, self.has_class_token)

    def _pos_embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The tokens with their absolute position embeddings, and the rotary embedding (RoPE ViTs)."""
        vit = self.vit
        if isinstance(vit, Eva):
            return vit._pos_embed(x)
        if self.pos_embed_resample == "timm" or tuple(x.shape[1:3]) == self.grid_size:
            return vit._pos_embed(x), None
        # timm's _pos_embed with DINO's resampling in place of timm's
        n_pos_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        pos = dino_resample_pos_embed(vit.pos_embed, self.grid_size, tuple(x.shape[1:3]), n_pos_prefix)
        x = x.flatten(1, 2)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
        x = torch.cat([*prefix, x + pos], dim=1) if vit.no_embed_class else torch.cat([*prefix, x], dim=1) + pos
        return vit.pos_drop(x), None


def has_layer_scale(vit: TimmViT) -> bool:
    """Whether the blocks scale their residual branches (timm ViT's ``ls1``, Eva's ``gamma_1``)."""
    block = vit.blocks[0]
    return getattr(block, "gamma_1", None) is not None or not isinstance(
        getattr(block, "ls1", nn.Identity()), nn.Identity
    )


def gather_tokens(tokens: Tensor, idx: Tensor) -> Tensor:
    """(B, N, D) tokens, (B, K) indices -> (B, K, D): each sample's tokens at its own indices."""
    return torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def dino_resample_pos_embed(
    pos_embed: Tensor, old_grid: tuple[int, int], grid: tuple[int, int], num_prefix_tokens: int
) -> Tensor:
    """DINO's ``interpolate_pos_encoding`` (also DINOv2's default): the patch position embeddings
    (an ``old_grid``) resampled bicubically without antialiasing to ``grid`` with the scale factor
    ``(side + 0.1) / old_side``, not ``side / old_side``: the 0.1 only guards the output size
    against float error, but the sampling positions follow the scale factor, so the values differ
    from a resize to ``grid`` (timm's way)."""
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    scale = ((grid[0] + 0.1) / old_grid[0], (grid[1] + 0.1) / old_grid[1])
    patches = patches.reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    patches = patches.to(pos_embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat([prefix, patches], dim=1)


def compile_blocks(module: nn.Module, **compile_kwargs: Any) -> int:
    """Compile, in place, every transformer block under ``module`` (encoders, EMA teachers, MAE's
    decoder): PyTorch's regional compilation. The blocks share one compiled graph, so compiling
    takes seconds rather than minutes, and the few token counts a run uses (MAE's visible tokens,
    DINO's global and local crops) each compile once. State-dict keys do not change. Returns the
    number of blocks compiled."""
    blocks = [b for name, seq in module.named_modules() if name.endswith("blocks") for b in seq.children()]
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def sincos_pos_embed_2d(embed_dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 1) -> Tensor:
    """MAE's fixed 2-D sin-cos position embedding, (num_prefix + h*w, D), prefix rows zero.

    The first half of the channels encodes the column, the second half the row; each half is
    [sin(pos * omega), cos(pos * omega)] with omega_i = 1 / 10000^(i / (D/4)).
    """
    if embed_dim % 4:
        raise UserError(f"a 2-D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    h, w = grid_size
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )

    def embed_1d(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    pos = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1)
    return torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=torch.float64), pos]).float()
