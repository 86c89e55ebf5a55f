"""Dense linear probe: the head and mIoU against references, label maps through shards and the
pipeline, and the probe end to end on shards whose label maps a random encoder can read."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ssl_vit.data import write_shards
from ssl_vit.data.pipeline import IGNORE_PIXEL, ShardDataset
from ssl_vit.data.shards import image_folder_samples, resolve_shards
from ssl_vit.data.views import EvalView
from ssl_vit.encoder import ViTEncoder
from ssl_vit.errors import UserError
from ssl_vit.eval import Evaluator
from ssl_vit.eval.segmentation import LinearSegmentationHead, segmentation_scores
from tests.conftest import TINY_ENCODER, png_bytes


def test_linear_segmentation_head_is_bn_then_1x1_conv_then_bilinear():
    torch.manual_seed(0)
    head = LinearSegmentationHead(dim=8, num_classes=3, grid=(2, 3), out_size=(8, 12)).eval()
    head.norm.running_mean.normal_()
    head.norm.running_var.uniform_(0.5, 2.0)
    tokens = torch.randn(2, 6, 8)
    x = tokens.reshape(2, 2, 3, 8)  # row-major patch order, channels last
    x = (x - head.norm.running_mean) / (
        head.norm.running_var + head.norm.eps
    ).sqrt() * head.norm.weight + head.norm.bias
    logits = torch.einsum("bhwd,cd->bchw", x, head.classify.weight[:, :, 0, 0]) + head.classify.bias[:, None, None]
    expected = nn.functional.interpolate(logits, size=(8, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(head(tokens), expected, atol=1e-5, rtol=1e-5)
    # half-pixel centres: output pixel 0 samples input position -0.375, clamped to patch 0's logits
    torch.testing.assert_close(head(tokens)[:, :, 0, 0], logits[:, :, 0, 0], atol=1e-5, rtol=1e-5)


class Given(nn.Module):
    """A 'head' whose input already is the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x


def test_miou_is_mmsegmentations_over_the_whole_split():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(6, 5, 5))  # class 4 of 5 never occurs...
    target[0, 0] = 255  # ...and some pixels are ignored
    pred = rng.integers(0, 4, size=(6, 5, 5))
    pred[1, 1, :2] = 4  # ...but is predicted twice
    masks = torch.from_numpy(np.where(target == 255, IGNORE_PIXEL, target))
    logits = nn.functional.one_hot(torch.from_numpy(pred), 5).permute(0, 3, 1, 2).float()
    scores = segmentation_scores(Given(), [(logits[:3], masks[:3]), (logits[3:], masks[3:])], 5)
    valid = target != 255
    ious = []
    for c in range(5):
        inter = ((pred == c) & (target == c) & valid).sum()
        union = (((pred == c) | (target == c)) & valid).sum()
        if union:
            ious.append(inter / union)
    assert scores["miou"] == pytest.approx(100 * np.mean(ious), abs=1e-3)
    assert scores["pixel_acc"] == pytest.approx(100 * ((pred == target) & valid).sum() / valid.sum(), abs=1e-3)
    assert scores["images"] == len(masks)  # what the scores count, said under the table


def colour_region_sample(rng: np.random.Generator, label: int) -> tuple[str, bytes, int, bytes]:
    """A 32-px image: a red square (class 1) or a blue one (class 2) on grey; its label map."""
    image = np.full((32, 32, 3), 128, np.uint8)
    labels = np.zeros((32, 32), np.uint8)
    y, x = rng.integers(0, 16, size=2)
    image[y : y + 16, x : x + 16] = (230, 30, 30) if label == 0 else (30, 30, 230)
    labels[y : y + 16, x : x + 16] = label + 1
    labels[y, x : x + 16] = 255  # an ignored edge row
    noisy = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    return "png", png_bytes(noisy), label, png_bytes(labels)


def region_shards(folder: Path, n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    samples = [colour_region_sample(rng, i % 2) for i in range(n)]
    write_shards(samples, folder, classes=["red", "blue"], source="test", samples_per_shard=16)
    return str(folder)


def test_label_maps_travel_through_shards_and_the_view(tmp_path):
    shards = region_shards(tmp_path / "s", 8, seed=0)
    _, index = resolve_shards(shards)
    assert index.mask_classes == ["0", "1", "2"]  # largest index written, 255 aside
    urls, _ = resolve_shards(shards)
    image, mask = next(iter(ShardDataset(urls, EvalView(32), shuffle_shards=False, masks=True)))
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= {0, 1, 2, IGNORE_PIXEL} and (mask == IGNORE_PIXEL).any()


@pytest.mark.parametrize("cache_gib", [4.0, 0.0])  # cached in memory, or streamed every epoch
def test_segmentation_probe_reads_regions_from_patch_tokens(tmp_path, cache_gib):
    train, val = region_shards(tmp_path / "train", 64, seed=0), region_shards(tmp_path / "val", 32, seed=1)
    evaluator = Evaluator(train, val, seg_epochs=15, probe_batch_size=16, token_cache_gib=cache_gib, num_workers=0)
    torch.manual_seed(0)
    scores = evaluator.segmentation_probe(ViTEncoder(**TINY_ENCODER))
    assert scores["miou"] > 60.0 and scores["pixel_acc"] > 85.0  # 3 classes; background alone is 75%


def test_image_folder_with_masks(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(4):
        _, image, label, mask = colour_region_sample(rng, i % 2)
        for root, data in (("images", image), ("maps", mask)):
            folder = tmp_path / root / ("red", "blue")[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.png").write_bytes(data)
    classes, samples, _ = image_folder_samples(tmp_path / "images", masks=tmp_path / "maps")
    index = write_shards(samples, tmp_path / "shards", classes=classes, source="test")
    assert classes == ["blue", "red"] and index.mask_classes == ["0", "1", "2"]

    Image.new("L", (8, 8)).save(tmp_path / "maps" / "red" / "0.png")  # the wrong size
    with pytest.raises(UserError, match=r"label map .*0\.png is 8x8, but its image is 32x32"):
        list(image_folder_samples(tmp_path / "images", masks=tmp_path / "maps")[1])
    (tmp_path / "maps" / "red" / "0.png").unlink()
    with pytest.raises(UserError, match="1 of 4 images have no label map"):
        image_folder_samples(tmp_path / "images", masks=tmp_path / "maps")


def test_a_colour_label_map_is_skipped_as_corrupt(tmp_path, caplog):
    rgb_map = io.BytesIO()
    Image.new("RGB", (32, 32)).save(rgb_map, format="PNG")
    good = colour_region_sample(np.random.default_rng(0), 0)
    write_shards([good, (*good[:3], rgb_map.getvalue())], tmp_path / "s", classes=["a"], source="test")
    urls, _ = resolve_shards(str(tmp_path / "s"))
    dataset = ShardDataset(urls, EvalView(32), shuffle_shards=False, masks=True)
    assert len(list(dataset)) == 1 and dataset.skipped.value == 1
    assert "seg.png is RGB, not an 8-bit map of class indices" in caplog.text


def test_a_class_index_outside_the_named_classes_stops_the_dense_probe(tmp_path):
    rng = np.random.default_rng(0)
    samples = [colour_region_sample(rng, i % 2) for i in range(8)]
    write_shards(samples, tmp_path / "s", classes=["a", "b"], source="test", mask_classes=["bg", "red"])  # no "blue"
    evaluator = Evaluator(str(tmp_path / "s"), str(tmp_path / "s"), seg_epochs=1, probe_batch_size=4, num_workers=0)
    with pytest.raises(UserError, match="a label map has class index 2, but the shards name 2 mask classes"):
        evaluator.segmentation_probe(ViTEncoder(**TINY_ENCODER))


def test_shards_without_label_maps_stop_the_dense_probe_in_one_line(tmp_path):
    samples = (("png", png_bytes(np.zeros((8, 8, 3), np.uint8)), i % 2) for i in range(4))
    write_shards(samples, tmp_path / "s", classes=["a", "b"], source="test", samples_per_shard=2)
    evaluator = Evaluator(str(tmp_path / "s"), str(tmp_path / "s"), segmentation=True)
    with pytest.raises(UserError, match=r"have no label maps .*, or turn the dense probe off \(segmentation: false\)$"):
        evaluator.check_shards()  # a recipe's dense probe: its setting can be turned off
    with pytest.raises(UserError, match=r"have no label maps .*--masks MAPS` .*docs/evaluation.md\)$"):
        evaluator.check_shards(labels=False, label_maps=True)  # `ssl-vit segprobe`: the probe is the command
    # a brace pattern of some of the shards: its index is its folder's, counted anew (the run trained,
    # then its end-of-run dense probe found no label map in any sample)
    pattern = str(tmp_path / "s/shard-{000000..000000}.tar")
    assert resolve_shards(pattern)[1].num_samples == 2 and Evaluator(pattern, pattern).without_label_maps()
    samples = [colour_region_sample(np.random.default_rng(0), i % 2) for i in range(4)]
    write_shards(samples, tmp_path / "maps", classes=["a", "b"], source="test", samples_per_shard=2)
    with_maps = str(tmp_path / "maps/shard-{000000..000000}.tar")
    assert not Evaluator(with_maps, with_maps).without_label_maps()
