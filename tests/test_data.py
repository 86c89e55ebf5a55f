import io
import itertools
import logging
import os
import pickle
import re
import signal
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ssl_vit.cli import stop_loader_workers
from ssl_vit.data import ShardDataset, ShardIndex, image_folder_samples, resolve_shards, write_shards
from ssl_vit.data.embedded import DATASETS, embedded_samples
from ssl_vit.data.shards import image_files
from ssl_vit.errors import UserError
from tests.conftest import png_bytes, random_images


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def read_all(urls, **kwargs):
    return list(ShardDataset(urls, as_array, shuffle_shards=False, **kwargs))


def test_imagefolder_shards_round_trip(tmp_path: Path):
    images = random_images(12, seed=1)
    for i, img in enumerate(images):
        folder = tmp_path / "src" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    classes, samples, count = image_folder_samples(tmp_path / "src")
    index = write_shards(samples, tmp_path / "out", classes=classes, source="test", samples_per_shard=5)
    assert count == 12 and index.source == "test" and index.classes == ["cat", "dog"]
    assert index.num_samples == 12 and len(index.shards) == 3
    assert ShardIndex.read(tmp_path / "out") == index
    urls, _ = resolve_shards(str(tmp_path / "out"))
    got = read_all(urls)
    expected = {(img.tobytes(), 0 if i % 2 else 1) for i, img in enumerate(images)}
    assert {(img.tobytes(), label) for img, label in got} == expected
    assert len(got) == 12


def test_a_messy_folder_reads_every_image_format_and_says_what_it_leaves_out(tmp_path: Path, caplog):
    images = random_images(6, seed=2)
    formats = {"a.bmp": "BMP", "b.tif": "TIFF", "c.TIFF": "TIFF", "d.gif": "GIF", "e.JPG": "JPEG", "f.png": "PNG"}
    for (name, fmt), img in zip(formats.items(), images, strict=True):
        folder = tmp_path / "photos" / ("red cars" if name < "d" else "café")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / name, format=fmt)
    (tmp_path / "photos/empty folder").mkdir()
    (tmp_path / "photos/notes.txt").write_text("not an image")
    (tmp_path / "photos/café/e.JPG.txt").write_text("a caption, misnamed")  # e.txt is e.JPG's
    (tmp_path / "photos/stray.txt").write_text("the caption of stray.png, left out with it")
    (tmp_path / "photos/Thumbs.db").write_bytes(b"\0")
    (tmp_path / "photos/.DS_Store").write_bytes(b"\0")  # hidden: not worth a word
    (tmp_path / "photos/@eaDir/red cars").mkdir(parents=True)  # a NAS's thumbnails: no class, no word
    Image.fromarray(images[0]).save(tmp_path / "photos/@eaDir/red cars/a.bmp.jpg")
    (tmp_path / "photos/café/IMG_1.HEIC").write_bytes(b"\0")  # a phone's photo Pillow does not read
    Image.fromarray(images[1]).save(tmp_path / "photos/café/g.jfif", format="JPEG")  # Windows' JPEG name
    Image.fromarray(images[0]).save(tmp_path / "photos/stray.png")
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.shards"):
        urls, index = resolve_shards(str(tmp_path / "photos"))
        resolve_shards(str(tmp_path / "photos"))  # said once, not at every look
    assert index.classes == ["café", "red cars"] and index.num_samples == 7  # the empty folder is no class
    (said,) = [r.getMessage() for r in caplog.records]
    assert "1 file that is not an image (.db: Thumbs.db)" in said and "'empty folder'" in said
    assert "1 photo in .heic, which Pillow does not read (café: 1): convert them to JPEG or PNG" in said
    beside_none = "2 text files beside no image of their name (café/e.JPG.txt; notes.txt; an image's caption is"
    assert f"{beside_none} photo.txt beside photo.jpg)" in said
    assert "1 image beside the class folders, in no class (stray.png)" in said and "1 sub-folder without" in said
    got = read_all(urls)
    assert sorted(label for _, label in got) == [0, 0, 0, 0, 1, 1, 1]
    pixels = {np.asarray(img).tobytes() for img, _ in got}
    assert all(images[i].tobytes() in pixels for i in (0, 1, 2, 5))  # lossless formats come back exactly


def test_one_sub_folder_beside_loose_images_is_no_class_layout_every_image_is_read(tmp_path: Path):
    """A folder of photos with one sub-folder (``2023/``) in it: an unlabelled folder, not one class
    of three images with the rest left out."""
    for i, img in enumerate(random_images(5, seed=4)):
        folder = tmp_path / "garden" / ("2023/summer" if i < 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    classes, files = image_files(tmp_path / "garden")
    assert classes == [] and len(files) == 5 and {label for _, label in files} == {None}


def test_a_broken_image_file_is_named_by_its_path_once_per_run(tmp_path: Path, caplog):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, img in enumerate(random_images(7, seed=3)):
        Image.fromarray(img).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"")  # a failed download
    urls, _ = resolve_shards(str(folder))
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.pipeline"):
        list(ShardDataset(urls, as_array))  # an evaluation pass, in this process, where the log can be read
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert skipped == [f"skipped {folder / 'broken.jpg'}: jpg is an empty file (0 bytes)"]
    (folder / "cut.png").write_bytes(png_bytes(random_images(1)[0])[:60])  # seen by the training loader first
    urls, _ = resolve_shards(str(folder))
    ds = ShardDataset(urls, as_array, batch_size=2, batches_per_epoch=3, shuffle_buffer=100, seed=0)
    for epoch in range(3):  # the loader's workers are new processes every epoch
        ds.start_epoch(epoch)
        assert len(list(DataLoader(ds, batch_size=2, num_workers=1))) == 3
        assert (ds.skipped.value, ds.read.value) == (2, 9)  # each file read once an epoch
    assert ds.skips_logged.value == 1  # cut.png, once: broken.jpg was named before


def test_a_broken_image_written_to_shards_is_named_by_its_file(tmp_path: Path, caplog):
    for name in ("cats", "dogs"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        Image.fromarray(random_images(1, seed=len(name))[0]).save(tmp_path / "photos" / name / "0.png")
    (tmp_path / "photos/cats/broken.jpg").write_bytes(b"")
    classes, samples, _ = image_folder_samples(tmp_path / "photos")
    write_shards(samples, tmp_path / "shards", classes=classes, source="test")
    urls, _ = resolve_shards(str(tmp_path / "shards"))
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.pipeline"):
        assert len(list(ShardDataset(urls, as_array))) == 2
    (skipped,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped")]
    assert re.fullmatch(
        r"skipped cats/broken\.jpg \(sample \d+ of .+\.tar\): jpg is an empty file \(0 bytes\)", skipped
    )


def test_readers_split_shards_disjointly_across_ranks_and_workers(numbered_shards):
    folder, _ = numbered_shards
    urls, _ = resolve_shards(str(folder))
    seen = Counter()
    for rank in range(2):  # a simulated 2-rank job, 2 loader workers per rank
        ds = ShardDataset(urls, as_array, rank=rank, world_size=2, seed=3)
        for _, labels in DataLoader(ds, batch_size=None, num_workers=2):
            seen[int(labels)] += 1
    assert seen == Counter(range(40))  # every sample exactly once: no shard read twice


def test_every_rank_gets_the_same_number_of_batches(tmp_path: Path):
    # 7 shards of unequal size over 2 ranks: rank 0 owns more samples than rank 1.
    sizes = [9, 9, 9, 9, 2, 2, 2]
    for i, n in enumerate(sizes):
        write_shards(
            (("png", png_bytes(img), i) for img in random_images(n, seed=i)),
            tmp_path / f"s{i}",
            classes=[],
            source="test",
        )
    urls = [str(tmp_path / f"s{i}" / "shard-000000.tar") for i in range(len(sizes))]
    counts = []
    for rank in range(2):
        ds = ShardDataset(urls, as_array, batch_size=4, batches_per_epoch=5, rank=rank, world_size=2)
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=lambda batch: batch)
        assert len(loader) == 5
        counts.append(sum(1 for _ in loader))
    assert counts == [5, 5]


def test_a_shuffle_buffer_larger_than_the_data_repeats_no_image_within_an_epoch(numbered_shards):
    # 40 images, 2 readers of 20 each, 2 batches of 8 per reader: a buffer of 1000 holds each
    # reader's whole pass, and must not fill up with copies of it from the passes after.
    urls, _ = resolve_shards(str(numbered_shards[0]))
    ds = ShardDataset(urls, as_array, batch_size=8, batches_per_epoch=4, shuffle_buffer=1000, seed=1)
    for epoch in range(2):
        ds.start_epoch(epoch)
        labels = [int(label) for _, labels in DataLoader(ds, batch_size=8, num_workers=2) for label in labels]
        assert len(labels) == 32 and len(set(labels)) == 32, sorted(Counter(labels).values())
        assert ds.read.value == 40  # each reader read its shards once
    # 3 batches of 12 over 2 workers: one makes 2 (24 images), which half the shards (20) cannot fill
    ds = ShardDataset(urls, as_array, batch_size=12, batches_per_epoch=3, shuffle_buffer=1000, seed=1)
    labels = [int(label) for _, labels in DataLoader(ds, batch_size=12, num_workers=2) for label in labels]
    assert len(labels) == 36 and len(set(labels)) == 36, sorted(Counter(labels).values())


def test_shard_order_is_keyed_on_seed_and_epoch(numbered_shards):
    urls, _ = resolve_shards(str(numbered_shards[0]))
    ds = ShardDataset(urls, as_array, seed=0)
    order0 = ds.reader_shards(0, 1)
    ds.epoch = 1
    assert ds.reader_shards(0, 1) != order0
    ds.epoch = 0
    assert ds.reader_shards(0, 1) == order0
    assert sorted(order0) == sorted(urls)


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


class _WouldRunCode:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_corrupt_members_are_skipped_counted_and_never_unpickled(tmp_path: Path, caplog):
    good = random_images(3, seed=5)
    marker = tmp_path / "pwned"
    payload = _WouldRunCode()
    payload.marker = marker
    valid_png = png_bytes(good[0])
    write_tar(
        tmp_path / "bad.tar",
        {
            "a.png": valid_png,
            "a.cls": b"1",
            "b.png": b"this is not an image",  # undecodable
            "b.cls": b"2",
            "c.png": valid_png[: len(valid_png) // 2],  # truncated
            "d.cls": b"3",  # no image at all
            "e.png": png_bytes(good[1]),
            "e.cls": b"seven",  # malformed label
            "f.png": png_bytes(good[2]),  # no label: fine, label -1
            "f.pyd": pickle.dumps(payload),  # never read, let alone unpickled
        },
    )
    ds = ShardDataset([str(tmp_path / "bad.tar")], as_array, shuffle_shards=False)
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.pipeline"):
        got = list(ds)
    assert [label for _, label in got] == [1, -1, -1]  # a label that is no class index is none: the image is read
    assert all(np.array_equal(image, want) for (image, _), want in zip(got, good, strict=True))
    assert (ds.skipped.value, ds.read.value) == (3, 6)
    assert "ignoring .pyd members" in caplog.text
    assert not marker.exists()


def test_truncated_shard_keeps_its_readable_head(numbered_shards, tmp_path: Path, caplog):
    folder, _ = numbered_shards
    shard = folder / "shard-000000.tar"
    cut = tmp_path / "cut.tar"
    with tarfile.open(shard) as tar:  # cut in the middle of the middle member's data
        members = tar.getmembers()
        middle = members[len(members) // 2]
    cut.write_bytes(shard.read_bytes()[: middle.offset_data + middle.size // 2])
    with caplog.at_level(logging.WARNING):
        got = read_all([str(cut), str(folder / "shard-000001.tar")])
    assert 5 < len(got) < 10  # the head of the cut shard, then all of the next one
    assert f"unreadable data in {cut} (ReadError: unexpected end of data); the rest" in caplog.text
    assert "<_io." not in caplog.text and "object at 0x" not in caplog.text  # the reason, not webdataset's objects


def test_missing_shards_are_a_clear_error(tmp_path: Path):
    with pytest.raises(UserError, match=r"2 of 2 shards .* are missing"):
        resolve_shards(str(tmp_path / "train-{0..1}.tar"))
    with pytest.raises(UserError, match=r"no shards found .*, nor images \(it is empty\)"):
        resolve_shards(str(tmp_path))
    (tmp_path / "notes").mkdir()
    for name in ("notes/a.txt", "b.TXT", "c.heic", "README"):
        (tmp_path / name).write_text("")
    said = r"nor images \(it holds 4 files, none an image: .heic; .txt; README; Pillow does not read .heic: convert"
    with pytest.raises(UserError, match=said):
        resolve_shards(str(tmp_path))
    for name in ("notes/a.txt", "b.TXT", "c.heic", "README"):
        (tmp_path / name).unlink()
    with pytest.raises(UserError, match="fotos does not exist: give a folder of images"):
        resolve_shards(str(tmp_path / "fotos"))  # a misspelled folder
    Image.fromarray(random_images(1)[0]).save(tmp_path / "IMG_0000.jpg")
    with pytest.raises(UserError, match=f"IMG_0000.jpg is a file, not a folder .* give its folder \\({tmp_path}\\)"):
        resolve_shards(str(tmp_path / "IMG_0000.jpg"))


def test_pipe_urls_are_kept_as_written():
    urls, index = resolve_shards("pipe:cat /data/train-{000..002}.tar")
    assert urls == [f"pipe:cat /data/train-00{i}.tar" for i in range(3)] and index is None


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_embedded_dataset_is_deterministic_and_balanced(dataset):
    classes = DATASETS[dataset][0]
    first = list(itertools.islice(embedded_samples("val", seed=0, dataset=dataset), 200))
    again = list(itertools.islice(embedded_samples("val", seed=0, dataset=dataset), 200))
    assert Counter(s.label for s in first) == Counter({c: 200 // len(classes) for c in range(len(classes))})
    assert all(s.image.size == (32, 32) and s.image.mode == "RGB" for s in first)
    pairs = zip(first, again, strict=True)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption for a, b in pairs)
    other = next(embedded_samples("val", seed=1, dataset=dataset))[0]
    assert not np.array_equal(np.asarray(first[0][0]), np.asarray(other))
    # images of one class differ from each other (colours, positions, clutter): no duplicates
    assert len({np.asarray(s.image).tobytes() for s in first}) == len(first)


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_embedded_label_maps_mark_the_object_with_its_class(dataset):
    """Each label map is the image's size, holds only 0 (background) and the image's class + 1,
    and marks some but (for drawn shapes and digits) not all pixels; the object's pixels differ
    in colour from the background's."""
    for image, mask, label, _ in itertools.islice(embedded_samples("val", seed=0, dataset=dataset), 100):
        labels = np.asarray(mask)
        assert mask.size == image.size and set(np.unique(labels)) <= {0, label + 1}
        on = labels == label + 1
        assert on.any()
        if on.all():  # the shapes' textures fill the image
            assert dataset == "shapes" and DATASETS[dataset][0][label] in ("stripes", "checkerboard", "dots")
            continue
        pixels = np.asarray(image, dtype=np.float64)
        assert np.abs(pixels[on].mean(0) - pixels[~on].mean(0)).sum() > 30


def test_mae_view_output():
    from ssl_vit.data import MAEView

    view = MAEView(size=32)
    out = view(Image.fromarray(random_images(1, size=48)[0]))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_loader_worker_leaves_ctrl_c_and_sigterm_to_the_training_process(tmp_path, signum):
    """At a terminal, Ctrl-C reaches the loader workers too, as does a SIGTERM that `timeout` or
    Slurm's scancel sends to the process group; the training process ends its step and saves, so a
    worker that died of it would fail that step ("worker ... is killed by signal: Terminated")."""
    samples = (("png", png_bytes(img), None) for img in random_images(64, size=16, seed=0))
    write_shards(samples, tmp_path / "shards", classes=[], source="test", samples_per_shard=64)
    urls, _ = resolve_shards(str(tmp_path / "shards"))
    batches = iter(DataLoader(ShardDataset(urls, as_array, shuffle_shards=False), batch_size=2, num_workers=1))
    next(batches)
    os.kill(batches._workers[0].pid, signum)
    assert len(list(batches)) == 31


def test_loader_workers_left_running_are_stopped_when_a_command_ends(tmp_path):
    """Workers ignore SIGTERM, so multiprocessing's terminate() at exit could not stop those of an
    epoch a Ctrl-C interrupted, and the process waited on them for ever (a fine-tuning run stopped
    in its last validation)."""
    samples = (("png", png_bytes(img), None) for img in random_images(64, size=16, seed=0))
    write_shards(samples, tmp_path / "shards", classes=[], source="test", samples_per_shard=64)
    urls, _ = resolve_shards(str(tmp_path / "shards"))
    batches = iter(DataLoader(ShardDataset(urls, as_array, shuffle_shards=False), batch_size=2, num_workers=1))
    next(batches)  # an epoch begun, its worker serving
    worker = batches._workers[0]
    worker.terminate()  # what multiprocessing does to its daemon children at exit
    worker.join(timeout=2)
    assert worker.is_alive()
    stop_loader_workers()
    worker.join(timeout=10)
    assert not worker.is_alive()
