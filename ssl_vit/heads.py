"""Projection heads shared by the objectives (small, composable, as in lightly)."""

from __future__ import annotations

import itertools
from functools import partial

import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

#: The LayerNorm of the official ViT codes (MAE, I-JEPA): eps 1e-6.
layer_norm_1e6 = partial(nn.LayerNorm, eps=1e-6)


def transformer_blocks(dim: int, depth: int, num_heads: int) -> nn.Sequential:
    """``depth`` pre-norm ViT blocks (timm ``Block``: MLP ratio 4, qkv bias, LayerNorm eps 1e-6),
    as MAE's decoder and I-JEPA's predictor build them."""
    return nn.Sequential(
        *[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=layer_norm_1e6) for _ in range(depth)]
    )


def projection_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's ``_build_mlp``: bias-free Linear layers with BatchNorm + ReLU between them and,
    if ``last_bn``, a BatchNorm without affine parameters on the output. MoCo v3 uses it for the
    projector (3 layers) and the predictor (2 layers); SimCLR for its projection head."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's head: MLP (GELU; BatchNorm after each hidden layer with ``use_bn``, DINO's
    ``use_bn_in_head``) to an L2-normalised bottleneck, then a weight-normalised linear layer to
    ``out_dim`` prototypes whose norms (weight norm's ``g``) start at 1, fixed there with
    ``norm_last_layer`` (DINO's ``main_dino.py``, for its ViTs) or trained without it (DINOv2's
    ``dinov2/layers/dino_head.py``)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out), *([nn.BatchNorm1d(d_out)] if use_bn else []), nn.GELU()]
        layers.append(nn.Linear(dims[-1], bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
