"""A user's own images, first try: a plain folder of images (class sub-folders, or none) is read
directly where shards are expected, evaluation reads a held-out part of it that training never
sees, and the loader's workers fit the shards there are."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ssl_vit.data import ShardDataModule, ShardDataset, resolve_shards
from ssl_vit.data.pipeline import evaluation_split
from ssl_vit.data.shards import (
    FILES_PER_GROUP,
    HELDOUT_FRACTION,
    MIN_GROUPS,
    data_fingerprint,
    image_files,
    image_folder_samples,
    is_heldout,
    write_shards,
)
from ssl_vit.errors import UserError
from ssl_vit.eval import Evaluator, EvalView
from ssl_vit.finetune import FineTune, FineTuneView, LabelledShardDataModule

from .conftest import png_bytes, random_images
from .fault_injection import in_this_process, pretrain_recipe_briefly

ROOT = Path(__file__).resolve().parents[1]


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
    # groups of files, small enough for several loader workers to each own a share fitting its batches
    assert len(shards) >= MIN_GROUPS and max(len(group.files) for group in shards) <= FILES_PER_GROUP
    samples = read_all(str(root))
    assert len(samples) == 150 and sorted({label for _, label in samples}) == [0, 1, 2]
    expected = {np.asarray(Image.open(p).convert("RGB")).tobytes() for p in root.rglob("*.png")}
    assert {pixels for pixels, _ in samples} == expected


@pytest.mark.parametrize("read_as", ["folder", "shards"])
def test_an_epoch_of_a_small_folder_reads_every_training_image_once(tmp_path, read_as):
    """About 108 training images, 3 batches of 32 over 2 loader workers (2 batches and 1): neither
    worker runs out of its own images and reads them twice (a new user's 120-image folder did),
    whether the folder is read directly or through the shards `ssl-vit shards imagefolder` writes."""
    root = image_folder(tmp_path / "photos", ["cat", "dog", "owl"], per_class=40)
    if read_as == "shards":
        assert in_this_process(tmp_path, "shards", "imagefolder", "photos", "shards").returncode == 0
        root = tmp_path / "shards"
    shards, index = resolve_shards(f"{root}#train")
    dataset = ShardDataset(shards, np.asarray, batch_size=32, batches_per_epoch=3, shuffle_buffer=1000)
    loader = DataLoader(dataset, batch_size=32, num_workers=2)
    images = [image.numpy().tobytes() for batch, _ in loader for image in batch]
    assert len(images) == 96 and len(set(images)) == 96
    if read_as == "folder":  # (a shard folder's index knows only the expected size of a part)
        assert dataset.read.value == index.num_samples  # one pass: each worker read its own images once


def test_class_folders_linked_in_are_read_once_and_a_broken_link_is_named(tmp_path, caplog):
    """A dataset assembled with ``ln -s`` (as torchvision's ImageFolder reads it): class folders
    that are links are read; a link back up the tree is not followed twice; a link to a file that
    is gone is skipped and named once, by its path and why (it was named every epoch, then called
    "no image member")."""
    image_folder(tmp_path / "elsewhere", ["cat", "dog"], per_class=4)
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("cat", "dog"):
        (root / name).symlink_to(tmp_path / "elsewhere" / name, target_is_directory=True)
    (root / "cat" / "up").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a loop
    (root / "dog" / "gone.png").symlink_to(tmp_path / "deleted.png")
    shards, index = resolve_shards(str(root))
    assert index.classes == ["cat", "dog"] and index.num_samples == 9
    dataset = ShardDataset(shards, np.asarray, shuffle_shards=False)
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.pipeline"):
        assert sorted(label for _ in range(2) for _, label in dataset) == [0] * 8 + [1] * 8
    assert dataset.skipped.value == 2
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"skipped {root / 'dog' / 'gone.png'}: cannot read the file (No such file or directory)"]
    # Shards written from it leave the broken link out, and say so, rather than stop with a traceback.
    caplog.clear()
    classes, samples, _ = image_folder_samples(root)
    with caplog.at_level(logging.WARNING, logger="ssl_vit.data.shards"):
        index = write_shards(samples, tmp_path / "shards", classes=classes, source="test")
    assert index.num_samples == 8
    assert [r.getMessage() for r in caplog.records] == [
        "left out 1 image that cannot be read (dog/gone.png: No such file or directory)"
    ]


@pytest.mark.parametrize("disk_order", ["by name", "reversed"])
def test_a_folder_and_a_link_to_it_read_the_first_by_name_whatever_the_disks_order(
    tmp_path, monkeypatch, caplog, disk_order
):
    """A class folder and a link to it in the same tree: the images are read once, under the first
    name in order ("cat", not "zebra"), whatever order the disk lists them in; the warning says the
    link was left out as a link, not as a folder without images."""
    root = image_folder(tmp_path / "photos", ["cat", "dog"], per_class=3)
    (root / "zebra").symlink_to(root / "cat", target_is_directory=True)
    scandir = os.scandir

    class Listed:  # os.scandir's iterator, in the order given (os.walk uses it with `with` and `next`)
        def __init__(self, path):
            self.entries = iter(sorted(scandir(path), key=lambda e: e.name, reverse=disk_order == "reversed"))

        def __iter__(self):
            return self

        def __next__(self):
            return next(self.entries)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(os, "scandir", Listed)
    classes, files = image_files(root)
    assert classes == ["cat", "dog"] and sorted(path for path, _ in files)[:3] == [f"cat/00{i}.png" for i in range(3)]
    (said,) = [record.getMessage() for record in caplog.records if "left out" in record.getMessage()]
    assert "left out 1 link to a class folder, read once under its own name ('zebra' -> 'cat');" in said
    assert "without images" not in said


def test_a_folder_resolved_again_sees_images_added_since(tmp_path):
    """A run resolves its folders many times; the second resolve of a changed folder reads the
    change, not the first listing (the classes are worked out again only when the listing changed)."""
    root = image_folder(tmp_path / "photos", ["cat", "dog"], per_class=5)
    assert resolve_shards(str(root))[1].num_samples == 10
    assert resolve_shards(str(root))[1].num_samples == 10
    Image.new("RGB", (8, 8)).save(root / "dog" / "new.png")
    (root / "owl").mkdir()
    Image.new("RGB", (8, 8)).save(root / "owl" / "first.png")
    _, index = resolve_shards(str(root))
    assert index.num_samples == 12 and index.classes == ["cat", "dog", "owl"]


def test_a_folder_moved_while_a_run_reads_it_is_named_as_moved(tmp_path, monkeypatch, capsys):
    root = image_folder(tmp_path / "photos", ["cat", "dog"], per_class=5)
    shards, _ = resolve_shards(str(root))
    root.rename(tmp_path / "photos-2024")
    with pytest.raises(UserError, match=r"photos no longer exists: moved or renamed while the run read it"):
        list(ShardDataset(shards, np.asarray, batch_size=4, batches_per_epoch=2))
    # Raised in a loader worker, the message reaches the user as itself, not under torch's traceback.
    import ssl_vit.cli

    wrapped = "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
    wrapped += '  File "x.py", line 1, in <module>\nssl_vit.errors.UserError: photos no longer exists: put it back'

    def raises(argv):
        raise UserError(wrapped)

    monkeypatch.setattr(ssl_vit.cli, "run_command", raises)
    with pytest.raises(SystemExit):
        ssl_vit.cli.main(["pretrain"])
    assert capsys.readouterr().err.strip() == "ssl-vit pretrain: error: photos no longer exists: put it back"


def test_an_unreadable_image_is_counted_once_and_a_top_up_pass_apart(tmp_path, caplog):
    """One broken file among 96: the epoch's 3 batches of 32 need one image more than the folder
    holds, so a reader takes one of its images again; the epoch's line counts every file once,
    the broken one once, and the image taken again apart (a new user's line said "read 224
    samples, skipped 2" for 160 files and one broken)."""
    root = image_folder(tmp_path / "photos", ["cat", "dog"], per_class=48)
    next((root / "cat").iterdir()).write_bytes(b"\xff\xd8 not a jpeg")
    shards, _ = resolve_shards(str(root))
    dataset = ShardDataset(shards, np.asarray, batch_size=32, batches_per_epoch=3, shuffle_buffer=1000)
    with caplog.at_level(logging.INFO, logger="ssl_vit.data.pipeline"):
        images = [image for batch, _ in DataLoader(dataset, batch_size=32, num_workers=2) for image in batch]
        dataset.log_epoch_summary()
    assert len(images) == 96 and (dataset.read.value, dataset.skipped.value) == (96, 1)
    assert dataset.read_again.value == 1  # the one image the epoch lacks, not a buffer's worth
    said = caplog.records[-1].getMessage()
    again = f"read {dataset.read_again.value} of them again to fill the epoch's batches"
    assert said == f"epoch 0: read 96 samples, 1 of them skipped; {again}"
    assert caplog.records[-1].levelno == logging.WARNING
    with caplog.at_level(logging.INFO, logger="ssl_vit.data.pipeline"):
        dataset.log_epoch_summary()  # the next epoch says the same: not a warning again (13 of them in 40 steps)
    assert caplog.records[-1].levelno == logging.INFO


def test_a_top_up_decodes_about_as_many_images_as_the_epoch_lacks(tmp_path, monkeypatch):
    """A folder one image short of its batches used to decode a batch's worth of images again (a
    new user's line: "read 126 of them again" for one broken file among 385) to take one."""
    import ssl_vit.data.pipeline as pipeline

    root = image_folder(tmp_path / "photos", ["cat", "dog"], per_class=48)
    next((root / "cat").iterdir()).write_bytes(b"\xff\xd8 not a jpeg")
    shards, _ = resolve_shards(str(root))
    decoded = []
    decode = pipeline.decode_sample
    monkeypatch.setattr(pipeline, "decode_sample", lambda *args: decoded.append(1) or decode(*args))
    dataset = ShardDataset(shards, np.asarray, batch_size=32, batches_per_epoch=3, shuffle_buffer=1000)
    assert len(list(dataset)) == 96 and dataset.read_again.value == 1
    assert len(decoded) <= 96 + 2  # every file once, then the one image lacking (webdataset reads ahead by one)


def test_a_misspelled_part_of_the_split_names_the_two_parts(tmp_path):
    root = image_folder(tmp_path / "photos", ["a", "b"], per_class=5)
    with pytest.raises(UserError, match=f"'#heldot' is not a part of the split; use {root}#train or {root}#heldout"):
        resolve_shards(f"{root}#heldot")


def test_a_folder_given_from_home_as_a_recipe_writes_it_is_found(tmp_path, monkeypatch):
    """``train_shards: ~/photos`` in a YAML recipe (or quoted on the command line) reaches ssl-vit
    unexpanded; like torchvision's datasets, ssl-vit expands it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    image_folder(tmp_path / "photos" / "train", ["cat", "dog"], per_class=4)
    image_folder(tmp_path / "photos" / "val", ["cat", "dog"], per_class=2)
    assert resolve_shards("~/photos/train#heldout")[1].source.startswith(f"image folder {tmp_path}")
    module = ShardDataModule("~/photos/train", view=lambda img: img)
    assert module.evaluation_data() == (f"{tmp_path}/photos/train", f"{tmp_path}/photos/val")


def test_an_unlabelled_folder_has_no_classes(tmp_path):
    root = image_folder(tmp_path / "photos", None)
    _, index = resolve_shards(str(root))
    assert index.classes == [] and {label for _, label in read_all(str(root))} == {-1}


def test_a_folder_with_one_class_folder_is_evaluated_as_unlabelled(tmp_path):
    """Every image in one sub-folder (photos/2024/...): one class, which no k-NN or probe can score;
    evaluation says so in one line instead of failing, and a one-class classifier stops at once."""
    root = image_folder(tmp_path / "photos", ["2024"], per_class=10)
    evaluator = Evaluator(f"{root}#train", f"{root}#heldout")
    assert "has one class folder (2024), and class labels need two or more" in evaluator.unlabelled()
    with pytest.raises(UserError, match="one class folder"):
        evaluator.check_shards()
    with pytest.raises(UserError, match="num_classes is 1; a classifier needs two or more classes"):
        FineTune(num_classes=1, encoder={"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8})


def test_a_baseline_measured_before_images_were_added_is_left_out(tmp_path):
    """The random-init column of a run resumed after the user added images was measured on other
    images than its end-of-run numbers: it is left out, with a line that says why."""
    from ssl_vit.eval import EvaluationCallback

    folder = image_folder(tmp_path / "photos", ["cats", "dogs"], per_class=30)
    evaluation = EvaluationCallback(train_shards=f"{folder}#train", val_shards=f"{folder}#heldout")
    evaluation.baseline, evaluation.baseline_data = {"knn": {"k=20": {"top1": 50.0}}}, evaluation.evaluated_data()
    resumed = EvaluationCallback(train_shards=f"{folder}#train", val_shards=f"{folder}#heldout")
    resumed.load_state_dict(evaluation.state_dict())
    resumed.on_fit_start(trainer=SimpleNamespace(ckpt_path="last.ckpt"), pl_module=None)
    assert resumed.baseline == evaluation.baseline  # the same images: kept
    image_folder(tmp_path / "more", ["cats"], per_class=31)
    (tmp_path / "more/cats/030.png").rename(folder / "cats/new.png")
    resumed.load_state_dict(evaluation.state_dict())
    with pytest.warns(UserWarning, match="changed since the step-0 evaluation .* the random init column"):
        resumed.on_fit_start(trainer=SimpleNamespace(ckpt_path="last.ckpt"), pl_module=None)
    assert resumed.baseline is None and resumed.state_dict()["baseline"] is None
    # a run saved before the files were hashed by where they are: nothing to compare, the baseline kept
    older = {k: v for k, v in evaluation.state_dict().items() if k != "baseline_files"} | {"baseline_data": "0ld"}
    resumed.load_state_dict(older)
    resumed.on_fit_start(trainer=SimpleNamespace(ckpt_path="last.ckpt"), pl_module=None)
    assert resumed.baseline == evaluation.baseline


def test_a_baseline_measured_by_other_evaluation_settings_is_left_out(tmp_path):
    """A run resumed with a recipe that pools or votes otherwise: its step-0 column was measured
    by the old protocol (it was printed beside the new one's numbers and put in the model card)."""
    from ssl_vit.eval import EvaluationCallback

    folder = image_folder(tmp_path / "photos", ["cats", "dogs"], per_class=30)
    splits = {"train_shards": f"{folder}#train", "val_shards": f"{folder}#heldout"}
    evaluation = EvaluationCallback(**splits)
    evaluation.baseline = {"knn": {"k=20": {"top1": 50.0}}}
    evaluation.baseline_data, evaluation.baseline_protocol = evaluation.evaluated_data(), evaluation.protocol()
    for same in ({}, {"num_workers": 1, "batch_size": 64}):  # how the images are read changes no number
        resumed = EvaluationCallback(**splits, **same)
        resumed.load_state_dict(evaluation.state_dict())
        resumed.on_fit_start(trainer=SimpleNamespace(ckpt_path="last.ckpt"), pl_module=None)
        assert resumed.baseline == evaluation.baseline
    resumed = EvaluationCallback(**splits, pooling="mean", knn_temperature=1.0)
    resumed.load_state_dict(evaluation.state_dict())
    with pytest.warns(UserWarning, match=r"settings changed .*pooling cls -> mean; knn_temperature 0.07 -> 1.0"):
        resumed.on_fit_start(trainer=SimpleNamespace(ckpt_path="last.ckpt"), pl_module=None)
    assert resumed.baseline is None and resumed.state_dict()["baseline"] is None


def test_the_data_fingerprint_follows_the_files_not_where_they_are(tmp_path):
    """A project moved with `mv` holds the same images: no "images changed" warning, no lost baseline."""
    image_folder(tmp_path / "photos", ["cats", "dogs"], per_class=10)
    samples = (("png", png_bytes(img), i % 2) for i, img in enumerate(random_images(20, size=16)))
    write_shards(samples, tmp_path / "shards", classes=["a", "b"], source="test", samples_per_shard=5)
    before = {spec: data_fingerprint(str(tmp_path / spec)) for spec in ("photos#train", "photos#heldout", "shards")}
    assert len(set(before.values())) == 3  # the two parts of a folder are other data
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for name in ("photos", "shards"):
        (tmp_path / name).rename(moved / name)
    assert {spec: data_fingerprint(str(moved / spec)) for spec in before} == before
    os.utime(next((moved / "photos/cats").iterdir()), (0, 0))  # one image rewritten
    assert (
        data_fingerprint(str(moved / "photos#train")) != before["photos#train"]
        or data_fingerprint(str(moved / "photos#heldout")) != before["photos#heldout"]
    )


def test_rewritten_captions_are_other_data(tmp_path):
    """CLIP reads the caption beside each image: a resume after they were rewritten trained on
    them silently, beside a step-0 baseline of the old ones."""
    folder = image_folder(tmp_path / "photos", ["cats", "dogs"], per_class=5)
    without = data_fingerprint(str(folder))
    for image in folder.rglob("*.png"):
        image.with_suffix(".txt").write_text(f"a photo of {image.parent.name}")
    captioned = data_fingerprint(str(folder))
    (folder / "cats/000.txt").write_text("a photo of a dog, long rewritten")
    assert len({without, captioned, data_fingerprint(str(folder))}) == 3


def test_a_broken_link_among_the_images_is_data_that_is_gone_not_a_crash(tmp_path):
    # Every run and `knn` on such a folder ended in a FileNotFoundError traceback, after saying it
    # would skip the link.
    folder = image_folder(tmp_path / "photos", ["cats", "dogs"], per_class=5)
    before = data_fingerprint(str(folder))
    (folder / "cats/broken.png").symlink_to(tmp_path / "missing.png")
    assert data_fingerprint(str(folder)) != before


def test_the_held_out_part_is_disjoint_deterministic_and_a_tenth(tmp_path):
    root = image_folder(tmp_path / "photos", ["a", "b"], per_class=200)
    train, heldout = read_all(f"{root}#train"), read_all(f"{root}#heldout")
    assert not {p for p, _ in train} & {p for p, _ in heldout}
    assert len(train) + len(heldout) == 400 and 0.05 < len(heldout) / 400 < 0.15
    assert resolve_shards(f"{root}#heldout")[1].num_samples == len(heldout)
    assert read_all(f"{root}#heldout") == heldout
    keys = [f"k{i}" for i in range(10_000)]
    assert abs(sum(map(is_heldout, keys)) / len(keys) - HELDOUT_FRACTION) < 0.01


def test_a_folder_and_the_shards_written_from_it_hold_out_the_same_images(tmp_path):
    """A run on the folder and a run on its shards evaluate on the same images (the shards keep
    each image's path, and the split hashes it)."""
    root = image_folder(tmp_path / "photos", ["a", "b"], per_class=60)
    assert in_this_process(tmp_path, "shards", "imagefolder", "photos", "shards").returncode == 0
    for part in ("#heldout", "#train"):
        from_folder, from_shards = read_all(f"{root}{part}"), read_all(f"{tmp_path / 'shards'}{part}")
        assert sorted(from_folder) == sorted(from_shards) and from_folder


def test_shards_leave_out_an_image_that_does_not_decode_and_name_it(tmp_path, caplog, monkeypatch):
    """And name the images written that every run would skip as too large (written without a word)."""
    root = image_folder(tmp_path / "photos", ["a", "b"], per_class=5)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    Image.new("RGB", (300, 200)).save(root / "b" / "panorama.png")
    monkeypatch.setattr("ssl_vit.data.pipeline.MAX_IMAGE_PIXELS", 50_000)  # 300 x 200 is more
    with caplog.at_level(logging.WARNING):
        result = in_this_process(tmp_path, "shards", "imagefolder", "photos", "shards")
    assert result.returncode == 0 and "wrote 11 samples of 2 classes in 11 shards" in result.stdout
    assert "left out 1 image that the loader would skip (a/broken.jpg: undecodable jpg: " in caplog.text
    assert "wrote 1 image of more than 0 megapixels (b/panorama.png: 300x200), which runs skip" in caplog.text
    assert json.loads((tmp_path / "shards/dataset.json").read_text())["num_samples"] == 11


def test_the_held_out_part_of_shards_is_split_by_sample(numbered_shards):
    folder, images = numbered_shards
    train, heldout = read_all(f"{folder}#train"), read_all(f"{folder}#heldout")
    assert sorted(label for _, label in train + heldout) == list(range(len(images)))


@pytest.mark.parametrize("val", ["val", "valid", "validation"])
def test_evaluation_reads_the_val_folder_beside_train_or_else_the_held_out_part(tmp_path, val):
    """torchvision's ``val`` beside ``train``, or Roboflow's and Kaggle's ``valid``."""
    photos = image_folder(tmp_path / "photos", ["a", "b"])
    module = ShardDataModule(str(photos), view=lambda i: i)
    assert module.evaluation_data() == (f"{photos}#train", f"{photos}#heldout")
    assert module.training_shards() == f"{photos}#train"
    split = tmp_path / "split"
    for name, classes in (("train", ["a", "b"]), (val, ["a", "b"]), ("test", ["a"])):
        image_folder(split / name, classes)
    module = ShardDataModule(str(split / "train"), view=lambda i: i)
    assert module.evaluation_data() == (str(split / "train"), str(split / val))
    explicit = ShardDataModule(str(photos), view=lambda i: i, val_shards=str(split / "val"))
    assert explicit.evaluation_data() == (str(photos), str(split / "val"))


@pytest.mark.parametrize("splits", [["train", "val"], ["test", "train", "valid"]])
def test_a_folder_of_split_folders_is_not_read_as_classes(tmp_path, splits):
    """``pets/train/cat``, ``pets/val/cat`` given as ``pets``: it was read as two classes, "train"
    and "val", so training read the val images and the probes reported train-versus-val accuracy."""
    for split in splits:
        image_folder(tmp_path / "pets" / split, ["cat", "dog"], per_class=2)
    said = f"holds the folders {' and '.join(splits)}, a dataset's splits, not its classes; give {tmp_path}/pets/train"
    with pytest.raises(UserError, match=re.escape(said)):
        resolve_shards(str(tmp_path / "pets"))
    with pytest.raises(UserError, match=re.escape(said)):
        image_folder_samples(tmp_path / "pets")  # `ssl-vit shards imagefolder pets ...`
    image_folder(tmp_path / "trains" / "train", ["cat"], per_class=2)  # a class may be called train
    image_folder(tmp_path / "trains", ["bus"], per_class=2)
    assert resolve_shards(str(tmp_path / "trains"))[1].classes == ["bus", "train"]


def test_sub_folders_that_are_no_classes_are_written_unlabelled_when_asked(tmp_path):
    """``raw/2026-11-01/*.png``: read as two classes (the dates), which the run's k-NN then
    scores; `ssl-vit shards imagefolder raw out --unlabelled` writes every image without one."""
    image_folder(tmp_path / "raw", ["2026-11-01", "2026-11-02"], per_class=3)
    image_folder(tmp_path / "raw", None, per_class=2)  # and two beside them
    assert resolve_shards(str(tmp_path / "raw"))[1].classes == ["2026-11-01", "2026-11-02"]
    result = in_this_process(tmp_path, "shards", "imagefolder", "raw", "out", "--unlabelled")
    assert result.returncode == 0, result.stderr[-2000:]
    _, index = resolve_shards(str(tmp_path / "out"))
    assert index.classes == [] and index.num_samples == 8  # every image, those beside the sub-folders too
    said = ShardDataModule(train_shards=str(tmp_path / "out"), view=EvalView(32)).describe()
    assert "no class labels" in said


def test_fine_tuning_without_val_shards_validates_on_what_a_run_evaluates_on(tmp_path):
    """`ssl-vit finetune ... --data.train_shards photos`: it validated on the recipe's own
    data/shapes/val (or stopped naming it); now on the held-out tenth, which training leaves out."""
    photos = image_folder(tmp_path / "photos", ["a", "b"], per_class=30)
    data = LabelledShardDataModule(str(photos), view=FineTuneView(size=16), batch_size=4, num_workers=0)
    data.check_labels(2)
    assert data.training_shards() == f"{photos}#train"
    validated = [label for _, labels in data.val_dataloader() for label in labels.tolist()]
    assert len(validated) == resolve_shards(f"{photos}#heldout")[1].num_samples > 0


def test_workers_fit_the_shards_there_are(numbered_shards, caplog):
    folder, _ = numbered_shards  # 8 shards
    module = ShardDataModule(str(folder), view=lambda i: i, val_shards=str(folder), batch_size=4, num_workers=6)
    with caplog.at_level(logging.WARNING):
        module.check_launch(world_size=2)
    assert module.num_workers == 4 and "data.num_workers 6 -> 4" in caplog.text
    with pytest.raises(UserError, match="8 shards cannot feed 9 devices"):
        module.check_launch(world_size=9)


def test_a_folder_of_shard_folders_is_named_as_such(tmp_path, numbered_shards):
    folder, _ = numbered_shards
    with pytest.raises(UserError, match=f"holds shard folders \\({folder.name}\\)"):
        resolve_shards(str(folder.parent))


# The README's own-images journey, run as written on a generated folder of PNGs, with only these
# appended to shorten it (the checks are about the journey working, not about accuracy).
SHORTER = {
    "pretrain": [
        "--trainer.max_epochs=1",
        "--trainer.callbacks.init_args.at_start=false",
        "--trainer.callbacks.init_args.probe_epochs=2",
        "--trainer.callbacks.init_args.attentive_epochs=1",
    ],
    "finetune": ["--trainer.max_epochs=1"],
}


def readme_section(title: str, page: str = "README.md") -> str:
    text = (ROOT / page).read_text()
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def readme_commands(title: str) -> list[list[str]]:
    """The ``ssl-vit`` commands of a README section's bash blocks, as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", readme_section(title), re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith("ssl-vit ")]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return in_this_process(cwd, *args, *SHORTER.get(args[0], []))


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory) -> Path:
    """A newcomer's working folder: the recipes, three classes of photos, more of them, and an
    unlabelled folder."""
    home = tmp_path_factory.mktemp("user")
    (home / "recipes").symlink_to(ROOT / "recipes")
    # Just over one batch of 128 left for training once a tenth is held out: one step per epoch.
    image_folder(home / "photos", ["cats", "dogs", "owls"], per_class=50)
    image_folder(home / "more_photos", ["cats", "owls"], per_class=75)
    image_folder(home / "unlabelled", None, per_class=150)
    return home


def test_the_readme_own_images_commands_run_as_written(user_folder):
    commands = readme_commands("Your own images")
    assert [c[0] for c in commands] == ["pretrain", "knn", "knn", "finetune", "pretrain"]
    for args in commands:
        result = run(args, user_folder)
        assert result.returncode == 0, f"ssl-vit {' '.join(args)}:\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr
        if (
            args == commands[0]
        ):  # nothing to warn of on a labelled folder (it has no segmentation label maps: a line says so)
            assert "warning" not in result.stderr.lower(), result.stderr
            assert (
                "the dense probe is skipped: photos#heldout has no segmentation label maps (`ssl-vit shards"
                in result.stderr
            )
            _, held = resolve_shards(str(user_folder / "photos#heldout"))  # the line that says what is read
            said = f"data: {150 - held.num_samples} images of photos#train in 3 classes (cats "
            assert said in result.stderr and f"; {held.num_samples} of photos#heldout for evaluation" in result.stderr
    run_folder = user_folder / "runs/photos/simclr"
    assert {"checkpoints", "export", "pictures", "summary.json"} <= {p.name for p in run_folder.iterdir()}
    assert json.loads((run_folder / "summary.json").read_text())["knn_k20_top1"] is not None
    # `ssl-vit knn RUN` without data evaluates as the run did: the held-out tenth of what it trained on
    records = [json.loads(r.read_text()) for r in (run_folder / "checkpoints").glob("last.knn.eval-*.json")]
    photos = str((user_folder / "photos").resolve())
    assert len(records) == 2  # its own weights and random ones; the run's own records are left as they were
    data = {"train_shards": f"{photos}#train", "val_shards": f"{photos}#heldout"}
    assert all(record["data"] | data == record["data"] for record in records)
    own = json.loads((run_folder / "checkpoints/last.knn.json").read_text())
    assert [r["results"] for r in records if r["weights"] != "random"] == [own["results"]]
    # On images added since, the same command says its numbers are of other images than the run's,
    # and writes beside its earlier record, not over it.
    added = user_folder / "photos/cats/added.png"
    shutil.copy(next((user_folder / "photos/dogs").iterdir()), added)
    try:
        again = run(commands[1], user_folder)
        of_export = run([*commands[1][:1], f"{commands[1][1]}/export", *commands[1][2:]], user_folder)
        # from another folder too: the run's records kept its data as it gave them ("photos#train")
        (user_folder / "elsewhere").mkdir(exist_ok=True)
        absolute = [commands[1][0], str(user_folder / commands[1][1]), *commands[1][2:]]
        from_elsewhere = run(absolute, user_folder / "elsewhere")
    finally:
        added.unlink()
    for warned in (again, of_export, from_elsewhere):
        assert warned.returncode == 0 and "the images changed since the run's own evaluation" in warned.stderr
    # from inside the export, whose record names its checkpoint as the run gave it (relative to the run's folder)
    inside = run(["knn", "."], run_folder / "export")
    assert inside.returncode == 0 and "Traceback" not in inside.stderr, inside.stderr[-2000:]
    assert len(list((run_folder / "checkpoints").glob("last.knn.eval-*.json"))) == 3
    # scored on the very images the neighbours come from: k-NN finds each image itself, and says so
    seen = run([*commands[1], "--val_shards", "photos"], user_folder)
    assert seen.returncode == 0 and "not of held-out images" not in again.stderr
    said = f"warning: photos holds the very images that the neighbours and probes learn from ({photos}), so these"
    assert said in seen.stderr
    assert (user_folder / "runs/photos/finetune/export/model.safetensors").is_file()
    for objective in ("simclr", "finetune"):  # trained on nine tenths of the folder, which the card says
        card = (user_folder / f"runs/photos/{objective}/export/README.md").read_text()
        # where the folder is, not where the run was started from: the card is read from elsewhere
        assert f"- training data: `{photos}`, less its held-out tenth (`#heldout`), which it was evaluated on" in card
    # what the run's accuracies count, from its own records: the held-out images and their classes
    card = (user_folder / "runs/photos/simclr/export/README.md").read_text()
    assert re.search(r"top-1 % \(\d+ images of 3 classes, [\d.]+ points each", card), card
    continued = json.loads((user_folder / "runs/more_photos/simclr/summary.json").read_text())
    card = (user_folder / "runs/more_photos/simclr/export/README.md").read_text()
    assert "- started from: `runs/photos/simclr/export` (init_from), whose own training this card" in card
    assert continued["steps"] > 0 and "the encoder starts from runs/photos/simclr/export (init_from)" in result.stderr


def test_an_unlabelled_folder_pretrains_and_says_why_the_probes_are_skipped(user_folder):
    first = readme_commands("Your own images")[0]
    result = run([arg.replace("photos", "unlabelled") for arg in first], user_folder)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stderr.splitlines() if "k-NN and the probes are skipped" in line]
    assert len(skipped) == 1 and "unlabelled has no class labels" in skipped[0]
    assert (user_folder / "runs/unlabelled/simclr/export/model.safetensors").is_file()
    assert list((user_folder / "runs/unlabelled/simclr/pictures").glob("health-rankme-*.png"))


def test_a_run_folder_inside_its_data_folder_stops_before_writing(tmp_path):
    """Started in the folder of images it trains on, a run would write runs/ there, and its
    evaluation (and every later run) would read its pictures as a class of images."""
    folder = image_folder(tmp_path / "holiday", ["beach", "hills"], per_class=10)
    recipe = str(ROOT / "recipes/quickstart/simclr.yaml")
    result = in_this_process(folder, "pretrain", "--config", recipe, "--data.train_shards", ".")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "the run folder runs/holiday/simclr is inside the data folder ." in result.stderr
    inside = ["--data.train_shards", str(folder), "--trainer.default_root_dir", str(folder / "beach/run")]
    result = in_this_process(tmp_path, "pretrain", "--config", recipe, *inside)
    assert result.returncode == 2 and "is inside the data folder" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["beach", "hills"] and not (folder / "beach/run").exists()
    named = tmp_path / "pictures"  # the run folder above data named as a folder the run writes
    folder.rename(named)
    result = in_this_process(
        tmp_path,
        "pretrain",
        "--config",
        recipe,
        "--data.train_shards",
        "pictures/beach",
        "--trainer.default_root_dir",
        ".",
    )
    assert result.returncode == 2 and "is in " in result.stderr and "where the run writes its pictures" in result.stderr
    assert sorted(p.name for p in named.iterdir()) == ["beach", "hills"]


@pytest.mark.parametrize("theirs", ["summary.json", "export/mymodel.bin", "export/README.md"])
def test_a_users_file_where_a_run_writes_at_its_end_stops_it_at_its_start(tmp_path, theirs):
    folder = image_folder(tmp_path / "holiday", ["beach", "hills"], per_class=10)
    run_folder = tmp_path / "runs/mine"
    (run_folder / theirs).parent.mkdir(parents=True)
    (run_folder / theirs).write_text('{"my": "notes"}')
    args = ["--data.train_shards", str(folder), "--data.batch_size=8", "--trainer.max_steps=1"]
    args += ["--trainer.default_root_dir", str(run_folder)]
    result = in_this_process(tmp_path, "pretrain", "--config", str(ROOT / "recipes/quickstart/simclr.yaml"), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    advice = "--export false" if "export" in theirs else "is not a summary ssl-vit wrote"
    said = result.stderr.strip().splitlines()[-1]
    assert advice in said and "at its end" in said
    assert (run_folder / theirs).read_text() == '{"my": "notes"}'
    assert sorted(p.relative_to(run_folder).as_posix() for p in run_folder.rglob("*")) == sorted(
        {theirs, *[str(parent) for parent in Path(theirs).parents if str(parent) != "."]}
    )


def own_tar_shards(folder: Path, label, name=lambda i: f"img{i:03d}") -> Path:
    """4 tar files of 8 random 32-px PNGs each, as a user's own script writes them (no
    dataset.json); ``label(i)`` is sample i's cls member (bytes), or None for none."""
    folder.mkdir(parents=True)
    for shard, images in enumerate(np.array_split(random_images(32, size=32), 4)):
        with tarfile.open(folder / f"shards-{shard}.tar", "w") as tar:
            for j, image in enumerate(images):
                i = 8 * shard + j
                members = {f"{name(i)}.png": png_bytes(image)}
                if label(i) is not None:
                    members[f"{name(i)}.cls"] = label(i)
                for member, data in members.items():
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def test_own_tar_shards_are_counted_and_read_with_their_labels_or_without(tmp_path, caplog):
    """A user's tar files without dataset.json: counted from their headers (no data.samples_per_epoch
    to give), their integer cls read as classes; without labels, or with labels that are no class
    index, the run trains and skips k-NN and the probes in one line (it stopped before training)."""
    labelled = own_tar_shards(tmp_path / "ints", lambda i: str(i % 3).encode())
    for spec in (str(labelled), str(labelled / "shards-{0..3}.tar")):
        _, index = resolve_shards(spec)
        assert index.num_samples == 32 and index.classes == ["0", "1", "2"]
    # its parts counted exactly, as they are read (not the expected tenth: the data line and the table agree)
    held = sum(is_heldout(f"shards-{i // 8}.tar/img{i:03d}") for i in range(32))
    parts = {part: resolve_shards(f"{labelled}#{part}") for part in ("train", "heldout")}
    assert parts["heldout"][1].num_samples == held == len(list(ShardDataset(parts["heldout"][0], lambda image: 0)))
    assert parts["train"][1].num_samples == 32 - held
    cases = {"none": (lambda i: None, ""), "names": (lambda i: b"sunsets", "")}
    for folder, (label, said) in cases.items():
        shards = own_tar_shards(tmp_path / folder, label)
        run = tmp_path / f"run-{folder}"
        run.mkdir()
        with caplog.at_level(logging.WARNING):
            result = pretrain_recipe_briefly(run, "recipes/quickstart/simclr.yaml", shards, {})
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"data: 32 images of {shards}, no class labels for training" in result.stderr
        assert said in caplog.text
    # class names where the class indices go: named by the one line on why k-NN and the probes are skipped
    names = str(tmp_path / "names")
    said = f"{names} has no class labels: its cls members are names, not class indices (first: sunsets in shards-"
    assert Evaluator(f"{names}#train", f"{names}#heldout").unlabelled().startswith(said)
    # images named with more dots than webdataset's key allows: said once, counted, not once per worker;
    # and when no image is left, that is the one line that stops the run
    dotted = own_tar_shards(tmp_path / "dotted", lambda i: b"0", name=lambda i: f"img{i}.2023" if i % 4 else f"img{i}")
    with caplog.at_level(logging.WARNING):
        resolve_shards(str(dotted))
        resolve_shards(str(dotted))
    assert caplog.text.count("24 images of") == 1 and "with more than one dot (first: img1.2023.png)" in caplog.text
    undotted = own_tar_shards(tmp_path / "all_dotted", lambda i: b"0", name=lambda i: f"img{i}.2023")
    with pytest.raises(UserError, match=r"32 images of .* have names with more than one dot \(first: img0.2023.png\)"):
        resolve_shards(str(undotted))


def test_shards_at_an_address_it_cannot_reach_stop_at_once_in_one_line(tmp_path):
    """webdataset's curl retries each unreachable shard for minutes (the run seemed to hang)."""
    shards = "http://127.0.0.1:9/shards-{000..007}.tar"  # nothing listens on the discard port
    args = ["--data.train_shards", shards, "--data.batch_size", "8"]  # said before its unknown size is
    result = in_this_process(tmp_path, "pretrain", "--config", str(ROOT / "recipes/quickstart/simclr.yaml"), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    said = result.stderr.strip().splitlines()[-1]
    assert "cannot reach http://127.0.0.1:9/shards-000.tar" in said and "no network from this machine" in said
    assert not (tmp_path / "runs").exists()


def test_a_folder_smaller_than_one_batch_stops_before_the_run_with_the_batch_to_use(user_folder):
    image_folder(user_folder / "few", ["cats", "dogs"], per_class=20)
    _, index = resolve_shards(str(user_folder / "few") + "#train")
    first = readme_commands("Your own images")[0]
    result = run([arg.replace("photos", "few") for arg in first], user_folder)
    assert result.returncode == 2
    assert (
        f"{index.num_samples} samples per epoch are fewer than one global batch (128 x 1 devices); set "
        f"--data.batch_size {index.num_samples} or less" in result.stderr
    )
    assert not (user_folder / "runs/few").exists()  # stopped before the trainer wrote anything


@pytest.mark.parametrize(("samples", "fix"), [(3, "set --data.batch_size 3 or less"), (1, "; add images")])
def test_the_batch_a_small_folder_is_told_to_use_is_one_it_can_train_with(samples, fix):
    """A batch of one is never advised: BatchNorm heads refuse it, and a contrastive loss has no pair."""
    data = ShardDataModule(train_shards="photos", view=EvalView(32), batch_size=128, samples_per_epoch=samples)
    with pytest.raises(UserError, match=re.escape(fix)) as refused:
        data.batches_per_epoch(None, world_size=1)
    assert "--data.batch_size 1 " not in str(refused.value) and "1 samples" not in str(refused.value)


def test_the_data_line_counts_a_folders_parts_and_estimates_a_shard_folders(tmp_path):
    """A folder's held-out tenth is known by its files; tar shards are split by each sample's key
    as it is read, so their parts' counts are the expected share, and said to be."""
    folder = image_folder(tmp_path / "photos", ["cats", "dogs"], per_class=30)
    held_files, held = resolve_shards(f"{folder}#heldout")
    kept = [30 - sum(label == c for group in held_files for _, label in group.files) for c in (0, 1)]
    said = ShardDataModule(train_shards=str(folder), view=EvalView(32)).describe()
    # each class's images, so that one nearly empty (its photos in a format not read) shows
    classes = f"2 classes (cats {kept[0]}; dogs {kept[1]})"
    assert said == f"{60 - held.num_samples} images of {folder}#train in {classes} for training; " + (
        f"{held.num_samples} of {folder}#heldout for evaluation"
    )
    samples = (("png", png_bytes(img), i % 2) for i, img in enumerate(random_images(60, size=16)))
    write_shards(samples, tmp_path / "shards", classes=["a", "b"], source="test", samples_per_shard=20)
    said = ShardDataModule(train_shards=str(tmp_path / "shards"), view=EvalView(32)).describe()
    assert said.startswith("about 54 images of ") and "; about 6 of " in said


def test_the_python_example_runs_as_written(user_folder, monkeypatch, capsys):
    (code,) = re.findall(r"```python\n(.*?)```", readme_section("From Python", "docs/recipes-and-data.md"), re.S)
    monkeypatch.chdir(user_folder)
    exec(compile(code, "docs/recipes-and-data.md", "exec"), {})
    assert "k=20" in capsys.readouterr().out
    assert (user_folder / "runs/photos/simclr-python/export/model.safetensors").is_file()


def test_a_fresh_start_in_a_finished_runs_folder_without_its_checkpoints_replaces_nothing(tmp_path):
    """Its checkpoints deleted (to free disk), a finished run's export is its only copy: a run
    started afresh there would write over it at its end."""
    folder = image_folder(tmp_path / "holiday", ["beach", "hills"], per_class=10)
    args = ["--config", str(ROOT / "recipes/quickstart/simclr.yaml"), "--data.train_shards", str(folder)]
    args += ["--data.batch_size=8", "--trainer.default_root_dir", "runs/mine"]
    assert in_this_process(tmp_path, "pretrain", *args, "--trainer.max_steps=2").returncode == 0
    run = tmp_path / "runs/mine"
    shutil.rmtree(run / "checkpoints")
    kept = {p: p.read_bytes() for p in [run / "summary.json", *(run / "export").iterdir()]}
    result = in_this_process(tmp_path, "pretrain", *args, "--trainer.max_steps=1")
    assert result.returncode == 2, result.stderr[-3000:]
    said = result.stderr.strip().splitlines()[-1]
    assert "summary.json is the summary of an earlier run (2 steps) with no checkpoint here to resume" in said
    assert {p: p.read_bytes() for p in kept} == kept and not (run / "checkpoints").exists()
    (run / "summary.json").unlink()  # the export alone
    result = in_this_process(tmp_path, "pretrain", *args, "--trainer.max_steps=1")
    assert result.returncode == 2 and "it is an earlier run's, which this run does not continue" in result.stderr


def test_a_summary_and_records_of_other_weights_at_the_same_step_are_not_taken_for_the_checkpoints(tmp_path):
    """A run rewound by --ckpt_path (with another lr) and stopped after its last step, before its
    end-of-run work, holds a last.ckpt at the step its old summary and records name: they are of
    other weights, so the same command does the end-of-run work, and an export's card leaves them out."""
    folder = image_folder(tmp_path / "holiday", ["beach", "hills"], per_class=10)
    args = ["--config", str(ROOT / "recipes/quickstart/simclr.yaml"), "--data.train_shards", str(folder)]
    args += ["--data.batch_size=8", "--trainer.default_root_dir", "runs/mine", "--trainer.max_steps=4"]
    args += ["--checkpoint.every_n_train_steps=2"]
    assert in_this_process(tmp_path, "pretrain", *args).returncode == 0
    run = tmp_path / "runs/mine"
    first = {p: p.read_bytes() for p in [run / "summary.json", *run.glob("checkpoints/last.*.json")]}
    rewound = [*args, "--model.init_args.base_lr=1e-2", f"--ckpt_path={next(run.glob('checkpoints/*step=2.ckpt'))}"]
    no_attentive = "--trainer.callbacks.init_args.head=linear"  # the first run's attentive record stays, of its weights
    assert in_this_process(tmp_path, "pretrain", *rewound, no_attentive).returncode == 0
    rewound_summary = json.loads((run / "summary.json").read_text())
    assert rewound_summary["probe_top1"] is not None and rewound_summary["attentive_top1"] is None
    rewound_loss = rewound_summary["final_loss"]
    for path, content in first.items():  # as if stopped before its end-of-run work: the first run's end
        path.write_bytes(content)
    card = in_this_process(tmp_path, "export", "runs/mine", "out")
    assert card.returncode == 0 and "- none recorded with this checkpoint" in (tmp_path / "out/README.md").read_text()
    again = in_this_process(tmp_path, "pretrain", *args[:-1], "--model.init_args.base_lr=1e-2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "was stopped before its end-of-run evaluation, export and summary were done: doing them now" in again.stderr
    ran = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["ssl_vit_run"]["weights_id"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights_id"] == ran
    assert summary["final_loss"] == rewound_loss is not None  # its last step's, though this session trained none
    assert json.loads((run / "checkpoints/last.knn.json").read_text())["weights_id"] == ran


def test_naming_the_held_out_tenth_as_val_data_trains_on_the_other_nine_tenths(tmp_path, monkeypatch):
    """`--data.val_shards photos#heldout` trained on all of photos, the scored tenth included, while
    its card said "less its held-out tenth"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    assert evaluation_split("photos", "photos#heldout") == ("photos#train", "photos#heldout")
    assert evaluation_split("photos", f"{tmp_path}/photos#heldout") == ("photos#train", f"{tmp_path}/photos#heldout")
    assert evaluation_split("photos", "other#heldout") == ("photos", "other#heldout")  # another folder's tenth
    assert evaluation_split("photos#train", "photos#heldout") == ("photos#train", "photos#heldout")


@pytest.mark.parametrize("setting", ["--data.view.init_args.size", "--model.init_args.encoder.img_size"])
def test_crops_of_another_size_than_the_encoders_stop_before_writing(tmp_path, setting):
    """The README says to set both sizes; with one alone, the run trained at one size and exported
    (config.json's input_size) and evaluated at the other, without a word."""
    folder = image_folder(tmp_path / "photos", ["beach", "hills"], per_class=10)
    recipe = str(ROOT / "recipes/quickstart/simclr.yaml")
    data = ["--data.train_shards", str(folder), "--data.batch_size", "8"]
    result = in_this_process(tmp_path, "pretrain", "--config", recipe, *data, setting, "64")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    crops, encoder = (64, 32) if "view" in setting else (32, 64)
    said = f"the encoder's img_size is {encoder} px but data.view makes {crops}-px crops"
    assert said in result.stderr and f"--model.init_args.encoder.img_size {crops} for these crops" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_an_empty_val_folder_beside_train_is_named_with_both_ways_out(tmp_path):
    image_folder(tmp_path / "tv/train", ["a", "b"], per_class=5)
    (tmp_path / "tv/val").mkdir()
    with pytest.raises(UserError, match=r"\(it is empty\).*; or remove it, and runs evaluate on the held-out tenth"):
        resolve_shards(str(tmp_path / "tv/val"))


def test_a_val_class_train_lacks_stops_the_run_before_writing(tmp_path):
    """Named in one line; Lightning's log folder, made before the callbacks' setup, was left behind."""
    image_folder(tmp_path / "tv/train", ["a", "b"], per_class=10)
    image_folder(tmp_path / "tv/val", ["a", "snow"], per_class=2)
    recipe = str(ROOT / "recipes/quickstart/simclr.yaml")
    data = ["--data.train_shards", "tv/train", "--data.batch_size", "8"]
    result = in_this_process(tmp_path, "pretrain", "--config", recipe, *data)
    assert result.returncode == 2 and "tv/val names classes snow that tv/train has not (a; b)" in result.stderr
    assert not (tmp_path / "runs").exists()
