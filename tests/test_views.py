import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ssl_vit.data import (
    EvalView,
    MAEView,
    MultiCropViews,
    ShardDataModule,
    ShardDataset,
    SimMIMView,
    TwoViews,
    decode_sample,
)
from ssl_vit.data.photometric import BLUR_SIGMA, JITTER, BatchedPhotometric
from ssl_vit.data.shards import write_shards
from ssl_vit.data.views import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import png_bytes


def smooth_image(width: int, height: int) -> np.ndarray:
    """A smooth colour gradient with a few edges, so that decoding at reduced size is comparable
    with resizing the full decode."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * 255
    img[height // 3 : height // 2, width // 4 : width // 2] = (200, 30, 90)
    return img.astype(np.uint8)


def jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_jpeg_decodes_at_the_smallest_scale_that_keeps_the_side_the_view_needs():
    array = smooth_image(1000, 800)
    image, label = decode_sample({"jpg": jpeg_bytes(array), "cls": b"3"}, min_side=190)
    assert label == 3 and image.mode == "RGB"
    assert image.size == (250, 200)  # 1/4 scale: 1/8 would give a 100-px short side, below 190
    full, _ = decode_sample({"jpg": jpeg_bytes(array)})
    assert full.size == (1000, 800)
    resized = np.asarray(full.resize(image.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(image, dtype=np.float32) - resized).mean() < 3  # same picture, at 1/4 size


def test_reduced_size_decoding_leaves_other_formats_and_small_images_whole():
    array = smooth_image(1000, 800)
    png, _ = decode_sample({"png": png_bytes(array)}, min_side=190)
    assert png.size == (1000, 800)
    small, _ = decode_sample({"jpg": jpeg_bytes(array[:300, :300])}, min_side=190)
    assert small.size == (300, 300)  # half size would be 150 < 190


@pytest.mark.parametrize(
    "view, size, scale",
    [
        (MAEView(32), 32, (0.2, 1.0)),
        (SimMIMView(32), 32, (0.67, 1.0)),
        (TwoViews(32), 32, (0.08, 1.0)),
        (MultiCropViews(32, 16, 2), 16, (0.05, 0.4)),  # the local crops need the most pixels
    ],
)
def test_no_crop_of_a_view_is_taken_from_fewer_pixels_than_it_outputs(view, size, scale):
    side = view.decode_side
    crop = v2.RandomResizedCrop(size, scale=scale)
    torch.manual_seed(0)
    image = torch.empty(3, side, side)
    shortest = min(min(crop.make_params([image])[k] for k in ("height", "width")) for _ in range(4000))
    assert size <= shortest <= size * 1.2  # enough pixels, and not much more than needed
    if isinstance(view, MultiCropViews):
        assert side >= MultiCropViews(32, 16, 0).decode_side


@pytest.mark.parametrize("size", [32, 48, 96, 224])
def test_timm_prepares_an_image_from_an_exports_config_as_the_evaluation_did(size, tmp_path):
    """A user deploying an export prepares images with timm's transform from its pretrained_cfg;
    at 32 px that resized to 36 where the evaluation view resized to 37 (round, not floor)."""
    import timm.data

    from ssl_vit.export import preprocessing_cfg

    vit = timm.create_model("vit_tiny_patch16_224", img_size=size, patch_size=16 if size % 16 == 0 else 8)
    config = timm.data.resolve_data_config(pretrained_cfg=preprocessing_cfg(vit.patch_embed.img_size))
    image = Image.fromarray(np.random.default_rng(size).integers(0, 256, (size * 3, size * 2, 3), dtype=np.uint8))
    view = EvalView(size)
    torch.testing.assert_close(view(image), timm.data.create_transform(**config)(image), rtol=0, atol=1e-6)
    # and from a JPEG as the evaluation reads it: decoded whole, as PIL decodes it for a deployment
    photo = tmp_path / f"{size}.jpg"
    photo.write_bytes(jpeg_bytes(smooth_image(640, 480)))
    write_shards([("jpg", photo.read_bytes(), 0)], tmp_path / f"s{size}", classes=["a"], source="test")
    ((read, _),) = ShardDataset([str(next((tmp_path / f"s{size}").glob("*.tar")))], view, shuffle_shards=False)
    torch.testing.assert_close(read, timm.data.create_transform(**config)(Image.open(photo)), rtol=0, atol=1e-6)


def test_shard_dataset_hands_the_view_a_reduced_decode(tmp_path: Path):
    samples = [("jpg", jpeg_bytes(smooth_image(640, 480)), 0)]
    write_shards(samples, tmp_path / "s", classes=["a"], source="test", samples_per_shard=1)

    def sizes(image: Image.Image) -> tuple[int, int]:
        return image.size

    sizes.decode_side = 100
    ((got, _),) = ShardDataset([str(tmp_path / "s" / "shard-000000.tar")], sizes, shuffle_shards=False)
    assert got == (160, 120)  # 1/4 scale; 1/8 would be 60 px < 100


def torchvision_photometric(image: torch.Tensor, p, i: int, kernel: int) -> torch.Tensor:
    """Sample ``i``'s augmentation done by torchvision's own kernels, with its drawn parameters."""
    x = TF.to_dtype(image, torch.float32, scale=True)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    if p.jitter[i]:
        for op in p.order[i].tolist():
            x = ops[op](x, float(p.factors[i, op]))
    if p.grayscale[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[i]:
        x = TF.gaussian_blur(x, [kernel, kernel], [float(p.sigma[i])] * 2)
    if p.solarize[i]:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def test_batched_photometric_matches_torchvision_sample_by_sample():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 24, 24), dtype=torch.uint8)
    images[:4] = images[:4, :1]  # some grey images: hue and saturation are undefined there
    augment = BatchedPhotometric(24, blur_p=0.5, solarize_p=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    params = augment.draw(len(images), images.device)
    got = augment.apply(images, params)
    for i in range(len(images)):
        expected = torchvision_photometric(images[i], params, i, augment.kernel_size)
        torch.testing.assert_close(got[i], expected, atol=2e-5, rtol=1e-5, msg=f"sample {i}")


def test_batched_photometric_draws_each_sample_on_its_own():
    torch.manual_seed(0)
    p = BatchedPhotometric(224, blur_p=1.0, solarize_p=0.2, mean=IMAGENET_MEAN, std=IMAGENET_STD).draw(20000, "cpu")
    assert abs(p.jitter.float().mean() - 0.8) < 0.02 and abs(p.grayscale.float().mean() - 0.2) < 0.02
    assert bool(p.blur.all()) and abs(p.solarize.float().mean() - 0.2) < 0.02
    assert sorted(p.order[0].tolist()) == [0, 1, 2, 3] and len({tuple(o) for o in p.order.tolist()}) == 24
    b, c, s, h = JITTER
    assert bool((p.factors >= torch.tensor([1 - b, 1 - c, 1 - s, -h])).all())
    assert bool((p.factors <= torch.tensor([1 + b, 1 + c, 1 + s, h])).all())
    assert torch.allclose(p.factors.mean(0), torch.tensor([1.0, 1.0, 1.0, 0.0]), atol=0.01)
    assert BLUR_SIGMA[0] <= float(p.sigma.min()) and float(p.sigma.max()) <= BLUR_SIGMA[1]
    assert p.factors[:, 0].std() > 0.2  # not one draw shared by the batch


@pytest.mark.parametrize(
    "view", [TwoViews(32, augment_on_device=True), MultiCropViews(32, 16, 2, augment_on_device=True)]
)
def test_views_augmented_on_device_crop_in_workers_and_finish_on_the_batch(view):
    image = Image.fromarray(smooth_image(48, 40))
    crops = view(image)
    assert all(c.dtype == torch.uint8 for c in crops)  # the workers only crop and flip
    batch = [torch.stack([c, c]) for c in crops]
    data = ShardDataModule("unused", view)
    finished, labels = data.on_after_batch_transfer((batch, torch.tensor([0, 1])), 0)
    assert [f.shape for f in finished] == [(2, *c.shape) for c in crops] and labels.tolist() == [0, 1]
    assert all(f.dtype == torch.float32 for f in finished)
    assert not all(torch.equal(f[0], f[1]) for f in finished)  # the two copies got their own draws
    cpu_view = type(view)(*([32] if isinstance(view, TwoViews) else [32, 16, 2]))
    assert [c.shape for c in cpu_view(image)] == [f.shape[1:] for f in finished]


@pytest.mark.parametrize("on_device", [False, True])
def test_multicrop_blur_kernel_spans_a_tenth_of_each_crop_or_dinov2s_fixed_9_px(on_device):
    def kernels(view: MultiCropViews) -> list[int]:
        if on_device:
            return [augment.kernel_size for augment in view.photometric]
        blurs = [t.transforms[0] for crop in view.crops for t in crop.transforms if isinstance(t, v2.RandomApply)]
        return [b.kernel_size[0] for b in blurs if isinstance(b, v2.GaussianBlur)]

    assert kernels(MultiCropViews(224, 96, 2, augment_on_device=on_device)) == [23, 23, 11, 11]
    assert kernels(MultiCropViews(224, 96, 2, augment_on_device=on_device, blur_kernel_size=9)) == [9] * 4
