"""Exact resume: the training loader's position survives a checkpoint, mid-epoch included, so a
killed and resumed run ends with the weights of an uninterrupted one. The end-to-end run is the
``kill_mid_epoch`` case of ``tests/fault_injection.py``, which ``tests/test_reliability.py`` runs
with the other fault cases; here, the loader's state round trip without training."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch

from ssl_vit.data import MAEView
from ssl_vit.data.pipeline import EpochLoader, ShardDataset
from tests.conftest import png_bytes, random_images

BATCH_SIZE, BATCHES_PER_EPOCH, EPOCH = 3, 7, 1
CORRUPT = {(1, 2), (4, 0)}  # (shard, sample) pairs that do not decode
# The 3-worker case runs more workers than this machine may have cores; that is fine here.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


def write_shards_with_corrupt_samples(folder: Path) -> list[str]:
    """6 shards of 5 random 16-px PNGs, labelled by their index, two of them corrupt."""
    folder.mkdir()
    images = iter(random_images(30))
    urls = []
    for shard in range(6):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(5):
                image = b"not an image" if (shard, i) in CORRUPT else png_bytes(next(images))
                for name, data in ((f"{shard}_{i}.png", image), (f"{shard}_{i}.cls", str(5 * shard + i).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{shard}.tar").write_bytes(buf.getvalue())
        urls.append(str(folder / f"{shard}.tar"))
    return urls


def training_loader(urls: list[str], num_workers: int) -> EpochLoader:
    """A loader as pretraining builds it, through a random view, so augmentations must line up too."""
    dataset = ShardDataset(
        urls,
        MAEView(size=8),
        batch_size=BATCH_SIZE,
        batches_per_epoch=BATCHES_PER_EPOCH,
        shuffle_buffer=4,
        seed=3,
    )
    return EpochLoader(dataset, current_epoch=lambda: EPOCH, batch_size=BATCH_SIZE, num_workers=num_workers)


@pytest.mark.parametrize(("num_workers", "stop_after"), [(0, 3), (2, 3), (3, 4)])
def test_a_loader_resumed_from_its_state_yields_the_rest_of_the_epoch_exactly(tmp_path, num_workers, stop_after):
    urls = write_shards_with_corrupt_samples(tmp_path / "shards")
    torch.manual_seed(0)
    uninterrupted_loader = training_loader(urls, num_workers)
    uninterrupted = list(uninterrupted_loader)

    torch.manual_seed(0)
    interrupted = training_loader(urls, num_workers)
    batches = iter(interrupted)
    for _ in range(stop_after):
        next(batches)
    state, rng = interrupted.state_dict(), torch.get_rng_state()  # what a checkpoint holds
    del batches  # its workers stop, as in a killed run

    resumed = training_loader(urls, num_workers)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)  # RunCheckpoint's part: without workers, the views draw from this RNG
    rest = list(resumed)
    assert len(rest) == BATCHES_PER_EPOCH - stop_after
    for (views, labels), (expected_views, expected_labels) in zip(rest, uninterrupted[stop_after:], strict=True):
        assert torch.equal(labels, expected_labels)
        assert torch.equal(views, expected_views)
    # The epoch's counts include what was read before the resume, as the uninterrupted run's do.
    counts = (resumed.dataset.read.value, resumed.dataset.skipped.value)
    assert counts == (uninterrupted_loader.dataset.read.value, uninterrupted_loader.dataset.skipped.value)
    assert counts[1] == len(CORRUPT)


def test_loader_workers_leave_the_training_process_rng_alone(tmp_path):
    """Creating the loader's iterator does not draw from it (MAE's masks do), resumed or not."""
    urls = write_shards_with_corrupt_samples(tmp_path / "shards")
    rng = torch.get_rng_state()
    list(training_loader(urls, num_workers=2))
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("change", ["num_workers", "data", "unrecorded"])
def test_a_state_from_another_loader_layout_restarts_the_epoch(tmp_path, caplog, change):
    """Another number of workers, data whose files changed since the checkpoint (images added to a
    folder), or a state that does not record its files (an older ssl-vit's): the batches may not
    line up, so the epoch starts again, with a warning that says which."""
    urls = write_shards_with_corrupt_samples(tmp_path / "shards")
    before = (urls[:-1], 2) if change == "data" else (urls, 1 if change == "num_workers" else 2)
    state = {**training_loader(*before).state_dict(), "epoch": EPOCH, "batches": 2}
    if change == "unrecorded":
        del state["data"]
    expected = [labels for _, labels in training_loader(urls, num_workers=2)]
    loader = training_loader(urls, num_workers=2)
    loader.load_state_dict(state)
    labels = [labels for _, labels in loader]
    said = {
        "num_workers": "num_workers 1 -> 2 changed since",
        "data": "the training data's files changed since",
        "unrecorded": "it does not record its data's files",
    }[change]
    assert f"; {said}, so its batches may not line up: epoch {EPOCH} is read again" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(labels, expected, strict=True))
