"""A user's own images, first try: a plain folder of images (class sub-folders, or none) is read
directly where shards are expected, evaluation reads a held-out part of it that training never
sees, and the loader's workers fit the shards there are."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_vit.data import ShardDataModule, ShardDataset, resolve_shards
from ssl_vit.data.shards import FILES_PER_GROUP, HELDOUT_FRACTION, is_heldout
from ssl_vit.errors import UserError

from .conftest import random_images


def image_folder(root: Path, classes: list[str] | None, per_class: int = 40) -> Path:
    """PNGs in one sub-folder per class (or all in ``root`` when ``classes`` is None); each
    image's pixels are its index, so a test can tell which image it got."""
    folders = [root / name for name in classes] if classes else [root]
    for c, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        for i, array in enumerate(random_images(per_class, seed=c)):
            Image.fromarray(array).save(folder / f"{i:03d}.png")
    return root


def read_all(spec: str) -> list[tuple[bytes, int]]:
    shards, _ = resolve_shards(spec)
    return [
        (np.asarray(img).tobytes(), label) for img, label in ShardDataset(shards, lambda i: i, shuffle_shards=False)
    ]


def test_an_image_folder_is_read_directly_with_its_classes(tmp_path):
    root = image_folder(tmp_path / "photos", ["cat", "dog", "owl"], per_class=50)
    shards, index = resolve_shards(str(root))
    assert index.classes == ["cat", "dog", "owl"] and index.num_samples == 150
    assert len(shards) == -(-150 // FILES_PER_GROUP)  # groups of files: several loader workers can read them
    samples = read_all(str(root))
    assert len(samples) == 150 and sorted({label for _, label in samples}) == [0, 1, 2]
    expected = {np.asarray(Image.open(p).convert("RGB")).tobytes() for p in root.rglob("*.png")}
    assert {pixels for pixels, _ in samples} == expected


def test_an_unlabelled_folder_has_no_classes(tmp_path):
    root = image_folder(tmp_path / "photos", None)
    _, index = resolve_shards(str(root))
    assert index.classes == [] and {label for _, label in read_all(str(root))} == {-1}


def test_the_held_out_part_is_disjoint_deterministic_and_a_tenth(tmp_path):
    root = image_folder(tmp_path / "photos", ["a", "b"], per_class=200)
    train, heldout = read_all(f"{root}#train"), read_all(f"{root}#heldout")
    assert not {p for p, _ in train} & {p for p, _ in heldout}
    assert len(train) + len(heldout) == 400 and 0.05 < len(heldout) / 400 < 0.15
    assert resolve_shards(f"{root}#heldout")[1].num_samples == len(heldout)
    assert read_all(f"{root}#heldout") == heldout
    keys = [f"k{i}" for i in range(10_000)]
    assert abs(sum(map(is_heldout, keys)) / len(keys) - HELDOUT_FRACTION) < 0.01


def test_the_held_out_part_of_shards_is_split_by_sample(numbered_shards):
    folder, images = numbered_shards
    train, heldout = read_all(f"{folder}#train"), read_all(f"{folder}#heldout")
    assert sorted(label for _, label in train + heldout) == list(range(len(images)))


def test_evaluation_reads_the_val_folder_beside_train_or_else_the_held_out_part(tmp_path):
    photos = image_folder(tmp_path / "photos", ["a", "b"])
    module = ShardDataModule(str(photos), view=lambda i: i)
    assert module.evaluation_data() == (f"{photos}#train", f"{photos}#heldout")
    assert module.training_shards() == f"{photos}#train"
    split = tmp_path / "split"
    image_folder(split / "train", ["a", "b"]), image_folder(split / "val", ["a", "b"])
    module = ShardDataModule(str(split / "train"), view=lambda i: i)
    assert module.evaluation_data() == (str(split / "train"), str(split / "val"))
    explicit = ShardDataModule(str(photos), view=lambda i: i, val_shards=str(split / "val"))
    assert explicit.evaluation_data() == (str(photos), str(split / "val"))


def test_workers_fit_the_shards_there_are(numbered_shards, caplog):
    folder, _ = numbered_shards  # 8 shards
    module = ShardDataModule(str(folder), view=lambda i: i, val_shards=str(folder), num_workers=6)
    with caplog.at_level(logging.WARNING):
        module.check_launch(world_size=2)
    assert module.num_workers == 4 and "data.num_workers 6 -> 4" in caplog.text
    with pytest.raises(UserError, match="8 shards cannot feed 9 devices"):
        module.check_launch(world_size=9)


def test_a_folder_of_shard_folders_is_named_as_such(tmp_path, numbered_shards):
    folder, _ = numbered_shards
    with pytest.raises(UserError, match=f"holds shard folders \\({folder.name}\\)"):
        resolve_shards(str(folder.parent))
