"""Runs that survive kills, pre-emption, truncated checkpoints, broken data, NaNs and bad recipes:
the end-to-end cases of ``tests/fault_injection.py``, and the pieces they rest on."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ssl_vit.checkpoint import AtomicCheckpointIO, newest_complete_checkpoint, rng_states, set_rng_states
from ssl_vit.cli.training import default_precision
from ssl_vit.data.pipeline import CorruptSample, ShardDataset, decode_sample, to_rgb
from ssl_vit.data.shards import image_folder_samples
from ssl_vit.errors import UserError
from tests.fault_injection import CASES, WouldRunCode, odd_mode_images, prepare, write_broken_shard


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("faults")
    prepare(work)
    return work


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_fault(case, work):
    outcome = case(work)
    assert outcome.ok, f"expected {outcome.expected}; observed {outcome.observed}"
    assert outcome.data_lost == "none"


def test_odd_image_modes_become_rgb():
    for name, data in odd_mode_images().items():
        with Image.open(io.BytesIO(data)) as img:
            rgb = to_rgb(img)
        assert rgb.mode == "RGB", name
        assert np.asarray(rgb).std() > 0 or name == "tiny.png", f"{name} came out flat"
    # 16-bit greyscale is scaled, not clipped: 65535 -> 255, 256 -> 1.
    grey16 = Image.fromarray(np.array([[0, 256, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(grey16))[0, :, 0].tolist() == [0, 1, 255]
    # 32-bit float greyscale (scientific TIFFs) is 0..1, or stretched when it goes beyond; never all
    # black, as PIL's own conversion makes 0..1 (NaN as 0).
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255, 0]
    floats = Image.fromarray(np.array([[-100.0, 1900.0, 3900.0]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]
    # Transparent pixels show the white background, not the colour they happen to hold.
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def sideways_photo(orientation: int) -> bytes:
    """A JPEG stored 40 wide and 20 high, red on its left half, with an EXIF orientation tag."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_a_phone_photo_is_read_upright_as_viewers_show_it(tmp_path, monkeypatch):
    # Orientation 6: shown turned 90 degrees clockwise, so 20 wide, 40 high, the red half on top.
    for min_side in (None, 8):  # decoded whole, and at reduced size (JPEG draft mode)
        image, _ = decode_sample({"jpg": sideways_photo(6)}, min_side=min_side)
        pixels = np.asarray(image)
        assert pixels.shape[:2] == ((40, 20) if min_side is None else (20, 10))
        assert pixels[1, 1, 0] > 200 and pixels[-2, 1, 0] < 50
    # Orientation 3: turned 180 degrees, the red half on the right.
    pixels = np.asarray(decode_sample({"jpg": sideways_photo(3)})[0])
    assert pixels.shape[:2] == (20, 40) and pixels[1, -2, 0] > 200 and pixels[1, 1, 0] < 50
    # EXIF that PIL fails on (Pillow #8605: a zero denominator) leaves the pixels as stored; the
    # image is not skipped.
    with monkeypatch.context() as patch:
        patch.setattr(ImageOps, "exif_transpose", lambda img: 1 / 0)
        assert decode_sample({"jpg": sideways_photo(6)})[0].size == (40, 20)
    # A label map drawn on the photo as shown (20 x 40) is its size.
    (tmp_path / "images").mkdir()
    (tmp_path / "maps").mkdir()
    (tmp_path / "images" / "photo.jpg").write_bytes(sideways_photo(6))
    Image.new("L", (20, 40)).save(tmp_path / "maps" / "photo.png")
    assert len(list(image_folder_samples(tmp_path / "images", masks=tmp_path / "maps")[1])) == 1


def test_broken_shard_counts_and_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled"
    write_broken_shard(tmp_path / "broken.tar", marker)
    ds = ShardDataset([str(tmp_path / "broken.tar")], lambda img: img.size, shuffle_shards=False)
    sizes = [size for size, _ in ds]
    assert len(sizes) == 8 and (1, 1) in sizes and (4000, 3000) in sizes
    assert (ds.read.value, ds.skipped.value) == (11, 4)
    assert not marker.exists()


def test_mostly_broken_data_stops_with_a_message(tmp_path):
    write_broken_shard(tmp_path / "broken.tar", tmp_path / "unpickled")
    ds = ShardDataset([str(tmp_path / "broken.tar")], lambda img: 0, shuffle_shards=False)
    for _ in range(3):  # 33 read, 12 skipped
        list(ds)
    ds.check_skips(max_fraction=0.5)  # 36% broken: tolerated
    with pytest.raises(Exception, match="12 of the 33 samples read so far in epoch 0 were unreadable"):
        ds.check_skips(max_fraction=0.1)


def test_newest_complete_checkpoint_falls_back_past_truncated_files(tmp_path):
    io = AtomicCheckpointIO()
    for step in (1, 2, 3):
        io.save_checkpoint({"global_step": step, "w": torch.randn(1000)}, tmp_path / f"step{step}.ckpt")
    data = (tmp_path / "step3.ckpt").read_bytes()
    (tmp_path / "step3.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        newest = newest_complete_checkpoint((tmp_path, "*.ckpt"))
    assert newest == tmp_path / "step2.ckpt"
    assert newest_complete_checkpoint((tmp_path, "nothing-*.ckpt")) is None
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_save_leaves_the_previous_checkpoint_when_writing_fails(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "x": Unsaveable()}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(tmp_path.iterdir()) == [path, tmp_path / "last.ckpt.sha256"]  # no temporary file left


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    states = rng_states()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.save(states, tmp_path / "rng.pt")
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], expected[0]) and again[1:] == expected[1:]


def test_a_checkpoint_that_would_run_code_is_never_unpickled(tmp_path):
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, tmp_path / "good.ckpt")
    marker = tmp_path / "unpickled"
    torch.save({"global_step": 2, "payload": WouldRunCode(marker)}, tmp_path / "newer.ckpt")
    with pytest.warns(UserWarning, match="skipping checkpoint .*newer.ckpt"):
        assert newest_complete_checkpoint((tmp_path, "*.ckpt")) == tmp_path / "good.ckpt"
    assert not marker.exists()


def test_precision_defaults_to_bf16_on_gpus_and_fp32_on_cpus():
    assert default_precision("auto", None, cuda=True) == "bf16-mixed"
    assert default_precision("gpu", None, cuda=True) == "bf16-mixed"
    assert default_precision("auto", None, cuda=False) == "32-true"
    assert default_precision("cpu", None, cuda=True) == "32-true"
    assert default_precision("gpu", "16-mixed", cuda=True) == "16-mixed"  # the recipe's choice stands
    for half in ("bf16-mixed", "16-mixed", 16):  # Lightning would make fp16 on a CPU bf16, without a word
        with pytest.raises(UserError, match="asks for half precision, but this run is on a CPU"):
            default_precision("cpu", half, cuda=True)
    with pytest.raises(UserError, match=r"trainer\.precision 64-true is not supported"):  # it failed in a traceback
        default_precision("gpu", "64-true", cuda=True)


def test_an_image_of_sides_far_apart_is_left_out_before_it_is_decoded():
    """A 3 KB PNG of 1,000,000 x 1 passed the pixel cap, and the evaluation view's resize of its
    short side to 36 px made it 36,000,000 x 36 pixels: 7.4 GB for one image."""

    def png_of(width: int, height: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (width, height), (9, 9, 9)).save(buf, format="PNG")
        return buf.getvalue()

    with pytest.raises(CorruptSample, match="1000000x1: its sides differ by more than 100 to 1"):
        decode_sample({"png": png_of(1_000_000, 1)})
    assert decode_sample({"png": png_of(3, 300)})[0].size == (3, 300)  # a long strip is still read
    with pytest.raises(CorruptSample, match="3x301"):
        decode_sample({"png": png_of(3, 301)})
