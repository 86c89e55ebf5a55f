"""Pictures: each objective's grids have the documented shape and show something; MAE's
reconstruction keeps the visible pixels; the attention maps are the CLS row of the last block's
softmax attention; the plots are drawn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_vit.encoder import ViTEncoder
from ssl_vit.pictures import (
    embedding_picture,
    last_block_attention,
    line_chart,
    patch_pca,
    picture_grid,
    to_display,
)
from tests.conftest import OBJECTIVES, TINY_ENCODER

EXPECTED = {  # the pictures each objective draws, and their columns
    "mae": {"attention": 3, "patch_pca": 2, "reconstruction": 4},
    "simmim": {"attention": 3, "patch_pca": 2, "reconstruction": 4},
    "dino": {"attention": 3, "patch_pca": 2},
    "mocov3": {"attention": 3, "patch_pca": 2},
    "simclr": {"attention": 3, "patch_pca": 2},
    "ijepa": {"attention": 3, "patch_pca": 2, "blocks": 3},  # blocks: the image, its context, its targets
}  # attention: the image + one column per head (TINY_ENCODER has 2); patch_pca: the image + its PCA colours


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_draws_its_pictures(name):
    factory, _ = OBJECTIVES[name]
    method = factory().eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pictures = method.pictures(images)
    assert {k: len(v) for k, v in pictures.items()} == EXPECTED[name]
    for columns in pictures.values():
        for column in columns:
            assert column.shape == (3, 3, 32, 32)
            assert column.min() >= 0 and column.max() <= 1
            assert column.std() > 0.01, "a blank column"
        grid = np.asarray(picture_grid(columns))
        scale = 96 // 32  # tiny images are enlarged
        assert grid.shape == ((3 * 34 + 2) * scale, (len(columns) * 34 + 2) * scale, 3)
        assert grid.std() > 1


def test_mae_reconstruction_keeps_the_visible_pixels():
    factory, _ = OBJECTIVES["mae"]
    method = factory().eval()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    with torch.no_grad():
        shown, masked, rebuilt, pasted = method.pictures(images)["reconstruction"]
    visible = (masked != 0.5).any(dim=1, keepdim=True).expand_as(shown)  # masked pixels are grey
    fraction_masked = 1 - visible[:, 0].float().mean()
    assert abs(fraction_masked - method.mask_ratio) < 0.05
    torch.testing.assert_close(pasted[visible], shown[visible])
    torch.testing.assert_close(pasted[~visible], rebuilt[~visible])
    torch.testing.assert_close(shown, to_display(images))


def test_attention_maps_are_the_cls_row_of_the_last_block_softmax():
    encoder = ViTEncoder(**TINY_ENCODER).eval()
    images = torch.randn(2, 3, 32, 32)
    maps = last_block_attention(encoder, images)
    assert maps.shape == (2, 2, 8, 8)  # heads, patch grid
    # Reference from the formula: softmax(q k^T / sqrt(d)) of the last block's input, CLS query.
    block = encoder.vit.blocks[-1]
    captured = []
    handle = block.norm1.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        encoder(images)
    handle.remove()
    x = captured[0]
    q, k, _ = block.attn.qkv(x).reshape(2, x.shape[1], 3, 2, -1).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(dim=-1)
    torch.testing.assert_close(maps, weights[:, :, 0, 1:].reshape(2, 2, 8, 8))
    assert encoder.vit.blocks[-1].attn.fused_attn  # the fast path is restored afterwards


def test_plots_are_drawn():
    chart = np.asarray(line_chart({"loss": [(0, 2.0), (10, 1.5), (20, 1.2)]}, "loss"))
    assert chart.shape == (320, 480, 3) and chart.std() > 1
    features, labels = torch.randn(300, 16), torch.arange(300) % 10
    scatter = np.asarray(embedding_picture(features, labels, "PCA"))
    assert scatter.shape == (444, 420, 3)
    colours = {tuple(c) for c in scatter.reshape(-1, 3)[::7].tolist()}
    assert len(colours) > 10  # the classes' colours, not one


def test_patch_pca_colours_are_the_first_principal_components():
    torch.manual_seed(0)
    encoder = ViTEncoder(**TINY_ENCODER).eval()
    images = torch.randn(4, 3, 32, 32)
    maps = patch_pca(encoder, images)
    assert maps.shape == (4, 3, 8, 8) and maps.min() == 0 and maps.max() == 1
    with torch.no_grad():
        x = encoder(images).patches.reshape(-1, TINY_ENCODER["embed_dim"]).double().numpy()
    x = x - x.mean(0)
    _, eigenvectors = np.linalg.eigh(x.T @ x)  # the covariance's eigenvectors, ascending
    for c in range(3):
        reference = x @ eigenvectors[:, -1 - c]
        reference = (reference - reference.min()) / (reference.max() - reference.min())
        got = maps[:, c].reshape(-1).double().numpy()
        # a principal direction's sign is arbitrary: the colour is the reference or its mirror
        assert min(np.abs(got - reference).max(), np.abs(got - (1 - reference)).max()) < 1e-4
