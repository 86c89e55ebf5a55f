"""Pictures: each objective's grids have the documented columns, headers and a title, and show
something; MAE's reconstruction keeps the visible pixels; the attention maps are the CLS row of the
last block's softmax attention; the plots have titles, labelled axes, legends and honest ranges."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.encoder import ViTEncoder
from ssl_vit.pictures import (
    PicturesCallback,
    embedding_picture,
    grid_heading,
    honest_limits,
    last_block_attention,
    line_chart,
    patch_pca,
    picture_grid,
    render,
    shard_class_names,
    to_display,
)
from tests.conftest import OBJECTIVES, TINY_ENCODER, fit_briefly

ATTENTION = ["image", "head 1", "head 2"]  # TINY_ENCODER has 2 heads
PCA = ["image", "principal components 1, 2, 3 = R, G, B"]
RECONSTRUCTION = ["original", "masked input", "reconstruction", "reconstruction + visible pixels"]
EXPECTED = {  # the pictures each objective draws, and their column headers (one line each)
    "mae": {"attention": ATTENTION, "patch_pca": PCA, "reconstruction": RECONSTRUCTION},
    "simmim": {"attention": ATTENTION, "patch_pca": PCA, "reconstruction": RECONSTRUCTION},
    "dino": {"attention": ATTENTION, "patch_pca": PCA},
    "mocov3": {"attention": ATTENTION, "patch_pca": PCA},
    "simclr": {"attention": ATTENTION, "patch_pca": PCA},
    "ijepa": {
        "attention": ATTENTION,
        "patch_pca": PCA,
        "blocks": ["image", "context (the rest grey)", "targets (a colour each)"],
    },
}


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_draws_its_pictures(name):
    assert name in EXPECTED, f"add the pictures {name} draws to EXPECTED"
    factory, _ = OBJECTIVES[name]
    method = factory().eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pictures = method.pictures(images)
    assert {k: len(v) for k, v in pictures.items()} == {k: len(v) for k, v in EXPECTED[name].items()}
    for picture, columns in pictures.items():
        for column in columns:
            assert column.shape == (3, 3, 32, 32)
            assert column.min() >= 0 and column.max() <= 1
            assert column.std() > 0.01, "a blank column"
        assert [one_line(header) for header in columns.headers] == EXPECTED[name][picture]
        assert columns.title, f"{picture} has no title"
        grid = picture_grid(columns)
        assert grid.width == len(columns) * (32 + 2) * 3 + 2 * 3 + 2 * 8  # enlarged 3 times, 8-pixel margins
        assert grid.height > 3 * (32 + 2) * 3 + 40  # the title and the headers above
    if "reconstruction" in pictures:
        assert re.search(r"\(\d+% masked, grey\)", pictures["reconstruction"].title)
    assert ("CLS token" in pictures["attention"].title) == (name != "ijepa")  # I-JEPA's encoder has none


def test_the_heading_is_the_title_and_a_header_per_column():
    heading = grid_heading("mine", ["column 1", "column 2"], [30, 90], 120)
    assert [text.get_text() for text in heading.texts] == ["mine", "column 1", "column 2"]
    assert [text.get_position()[0] for text in heading.texts] == [0.5, 0.25, 0.75]  # centred on their columns
    assert render(heading).width == 120
    plain = picture_grid([torch.rand(2, 3, 32, 32)] * 2, title="mine")  # an objective's own picture
    assert plain.width == 2 * (32 + 2) * 3 + 2 * 3 + 2 * 8


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


def test_curves_have_titles_labelled_axes_legends_and_honest_ranges():
    knn = line_chart({"k-NN k=20 top-1 %": [(0, 40.0), (10, 40.3), (20, 40.7)]}, "k-NN accuracy")
    (axes,) = knn.axes
    assert (axes.get_title(), axes.get_xlabel(), axes.get_ylabel()) == ("k-NN accuracy", "step", "%")
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["k-NN k=20 top-1 %"]
    low, high = axes.get_ylim()
    assert high - low >= 10 and 0 <= low < 40 and 40.7 < high <= 100  # 0.7 points is a small change
    loss = line_chart({"train/loss": [(0, 5.0), (10, 4.9)]}, "loss", y_label="loss")
    low, high = loss.axes[0].get_ylim()
    assert high - low >= 0.5 and loss.axes[0].get_ylabel() == "loss"  # a tenth of the largest value
    assert render(knn).size == (640, 400)
    first = line_chart({"k-NN k=20 top-1 %": [(0, 15.2)]}, "k-NN accuracy").axes[0]
    assert list(first.get_xticks()) == [0]  # no fractions of a step
    empty = line_chart({"train/loss": []}, "loss")
    assert [t.get_text() for t in empty.axes[0].texts] == ["no data yet"]


def test_limits_span_the_minimum_inside_the_bounds():
    # 10 points and a 5% margin each side, moved inside [0, 100]
    assert honest_limits([99.5, 99.9], 10, (0, 100)) == pytest.approx((89, 100))
    assert honest_limits([0.2, 0.3], 10, (0, 100)) == pytest.approx((0, 11))
    low, high = honest_limits([1.0, 3.0], 0.1)
    assert low < 1.0 and high > 3.0 and high - low == pytest.approx(2.2)  # wide data: 5% margins


def test_the_embedding_map_has_a_class_legend_and_labelled_axes():
    features, labels = torch.randn(300, 16), torch.arange(300) % 3
    names = ["circle", "square", "triangle"]
    (axes,) = embedding_picture(features, labels, "PCA", class_names=names).axes
    assert [t.get_text() for t in axes.get_legend().get_texts()] == names
    assert axes.get_title() == "PCA" and axes.get_xlabel().startswith("principal component 1 (")
    assert axes.get_ylabel().startswith("principal component 2 (")
    unnamed = embedding_picture(features, torch.where(labels == 2, -1, labels), "PCA").axes[0]
    assert [t.get_text() for t in unnamed.get_legend().get_texts()] == ["unlabelled", "class 0", "class 1"]


def test_the_embedding_map_of_one_image_is_drawn():
    """A small folder's held-out tenth can be one image (its PCA has one component)."""
    (axes,) = embedding_picture(torch.randn(1, 16), torch.tensor([0]), "PCA").axes
    assert axes.get_ylabel() == "principal component 2 (0% of variance)"


def test_class_names_come_from_the_shards_index(numbered_shards):
    shards, _ = numbered_shards
    assert shard_class_names(str(shards)) == [str(i) for i in range(40)]


def test_the_callback_writes_each_picture_as_a_png(tmp_path, numbered_shards):
    shards, _ = numbered_shards
    factory, view = OBJECTIVES["mae"]
    pictures = PicturesCallback(shards=str(shards), num_images=2)
    fit_briefly(factory(), view, steps=3, callbacks=[pictures], default_root_dir=str(tmp_path))
    # a run shorter than the log interval has its first and last step drawn ("no data yet" before)
    assert [step for step, _ in pictures.losses] == [1, 3] and all(math.isfinite(y) for _, y in pictures.losses)
    drawn = {p.name.split("-step=")[0]: p for p in (tmp_path / "pictures").glob("*.png")}
    assert set(drawn) == {"loss", "attention", "patch_pca", "reconstruction"}
    with Image.open(drawn["loss"]) as loss:
        assert loss.size == (640, 400)
    with Image.open(drawn["reconstruction"]) as grid:
        assert grid.width >= 4 * 96 and grid.height > 2 * 96  # tiny images enlarged, under their headers


def test_a_run_replaces_its_own_pictures_and_no_one_elses(tmp_path, numbered_shards, caplog):
    """A user's file named like a run picture (pictures/loss-step=00000001.png) was overwritten."""
    shards, _ = numbered_shards
    factory, view = OBJECTIVES["mae"]
    (tmp_path / "pictures").mkdir()
    theirs = tmp_path / "pictures" / "loss-step=00000001.png"
    Image.new("RGB", (5, 5), "red").save(theirs)
    mine = tmp_path / "pictures" / "attention-step=00000001.png"

    def draw() -> int:
        pictures = PicturesCallback(shards=str(shards), num_images=2)
        fit_briefly(factory(), view, steps=1, callbacks=[pictures], default_root_dir=str(tmp_path))
        with Image.open(theirs) as kept:
            assert kept.size == (5, 5)
        return mine.stat().st_mtime_ns

    first = draw()
    assert draw() > first  # the second run draws over the first's pictures
    assert "loss-step=00000001.png is not a picture a run drew" in caplog.text


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
