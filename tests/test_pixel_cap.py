"""Images too large to decode safely (a small file that declares a huge size) are skipped from
their header and counted like corrupt ones, in pretraining and evaluation alike."""

from __future__ import annotations

import io
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_vit.data.pipeline import MAX_IMAGE_PIXELS, CorruptSample, ShardDataModule, ShardDataset, decode_sample
from tests.conftest import png_bytes


def png_declaring(width: int, height: int) -> bytes:
    """A real 1 x 1 PNG whose header says ``width`` x ``height``: PIL reports that size without
    decoding anything, and decoding fails (the pixel data is one pixel's)."""
    data = bytearray(png_bytes(np.zeros((1, 1, 3), dtype=np.uint8)))
    # The 8-byte signature, then the IHDR chunk: length, type, width, height, 5 more bytes, CRC.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    return bytes(data)


def write_shard(path: Path, images: list[bytes]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, image in enumerate(images):
            for name, data in ((f"{i}.png", image), (f"{i}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return str(path)


def test_an_image_declaring_too_many_pixels_is_skipped_without_decoding(tmp_path):
    huge = png_declaring(12000, 12000)
    # Said once, in ssl-vit's words: 144 megapixels is also over PIL's warning, which must not repeat it.
    too_large = rf"png is 12000x12000 \(144 megapixels\), .* = {MAX_IMAGE_PIXELS}"
    with pytest.raises(CorruptSample, match=too_large), warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_sample({"png": huge})
    # Decoding it is what a higher cap would try, and fails otherwise: the size check came first.
    with pytest.raises(CorruptSample, match="undecodable png"):
        decode_sample({"png": huge}, max_pixels=12000 * 12000)

    good = png_bytes(np.zeros((16, 16, 3), dtype=np.uint8))
    shard = write_shard(tmp_path / "shard.tar", [good, huge, good])
    dataset = ShardDataset([shard], lambda image: image.size, shuffle_shards=False)
    assert [size for size, _ in dataset] == [(16, 16), (16, 16)]
    assert (dataset.read.value, dataset.skipped.value) == (3, 1)


def test_the_pixel_cap_is_a_data_setting(tmp_path):
    images = [png_bytes(np.zeros((side, side, 3), dtype=np.uint8)) for side in (8, 16, 8)]
    shard = write_shard(tmp_path / "shard.tar", images)
    data = ShardDataModule(
        shard,
        lambda image: torch.tensor(image.size),
        batch_size=1,
        num_workers=0,
        shuffle_buffer=0,
        samples_per_epoch=2,
        max_image_pixels=100,  # 8 x 8 passes, 16 x 16 does not
    )
    data.setup("fit")
    assert [size.tolist() for size, _ in data.train_dataloader()] == [[[8, 8]], [[8, 8]]]
    assert data.train_set.skipped.value == 1
