"""Writing WebDataset tar shards (from an ImageFolder tree or the embedded dataset) and resolving a
recipe's shard specification into a list of shard URLs.

A shard folder written here holds ``shard-000000.tar ...`` and ``dataset.json`` (sample count,
class names by index, shard names, source), so a recipe can name just the folder.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import ExifTags, Image, ImageOps
from webdataset.tariterators import base_plus_ext

from ssl_vit.data import embedded
from ssl_vit.errors import UserError, counted, first_few, first_time_named
from ssl_vit.replace import OutputKind, check_replaceable, recover_interrupted_replacements, replace_output, writer_id

log = logging.getLogger(__name__)

INDEX_FILE = "dataset.json"
SHARD_FOLDER = OutputKind(
    f"a shard folder (shard-*.tar, {INDEX_FILE})",
    ("shard-*.tar", INDEX_FILE),
    required=(INDEX_FILE,),
    record=INDEX_FILE,
)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "jfif", "jpe", "png", "webp", "bmp", "gif", "tif", "tiff")
#: Photos in formats Pillow does not read (a phone's HEIC, a camera's RAW): named apart, with what to do.
UNREAD_PHOTO_EXTENSIONS = frozenset(
    ("heic", "heif", "avif", "jxl", "dng", "cr2", "cr3", "nef", "arw", "raf", "orf", "rw2", "pef", "srw")
)
#: Folders of thumbnails and metadata that NAS and archive tools add beside the photos, never classes.
TOOL_FOLDERS = frozenset(("@eaDir", "__MACOSX"))
MASK_MEMBER = "seg.png"  # a sample's label map for dense probes: 8-bit PNG of class indices
CAPTION_MEMBER = "txt"  # a sample's caption, UTF-8 (image-text objectives: CLIP)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # a data path naming one shard file


@dataclass
class ShardIndex:
    num_samples: int
    classes: list[str]
    shards: list[str]
    source: str
    mask_classes: list[str] | None = None  # names of the label-map values, when samples carry ``seg.png``
    captions: int | None = None  # how many samples carry a caption (``txt``); None: written before this was counted

    @classmethod
    def read(cls, folder: Path) -> ShardIndex | None:
        path = folder / INDEX_FILE
        if not path.exists():
            return None
        content = json.loads(path.read_text())
        content = content if isinstance(content, dict) else {}
        missing = [field.name for field in fields(cls) if field.default is MISSING and field.name not in content]
        if missing:
            raise UserError(f"{path} is not the index `ssl-vit shards` writes: it has no {', '.join(missing)}")
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in content.items() if key in known})  # not the record of its files


#: One sample to write: (image extension, image bytes, class or None[, label-map PNG bytes or
#: None[, caption (text, or its UTF-8 bytes as read) or None[, the image file's path or None]]]).
Sample = (
    tuple[str, bytes, int | None]
    | tuple[str, bytes, int | None, bytes | None]
    | tuple[str, bytes, int | None, bytes | None, str | bytes | None]
    | tuple[str, bytes, int | None, bytes | None, str | bytes | None, str | None]
)
#: The member that names the file a sample was written from (``{"source": "cats/a.jpg"}``), so
#: that an image that does not decode can be named by its file.
SOURCE_MEMBER = "json"


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | Path,
    classes: list[str],
    source: str,
    samples_per_shard: int = 1000,
    max_shard_bytes: int = 1 << 30,
    overwrite: bool = False,
    mask_classes: list[str] | None = None,
    reads: Iterable[str | Path] = (),
) -> ShardIndex:
    """Write samples as tar shards plus ``dataset.json``; a ``None`` class writes no ``cls``
    member (unlabelled data), a label map a ``seg.png`` member (one class index per pixel, 255 =
    ignore; ``mask_classes`` names the indices, by default "0" up to the largest index written),
    a caption a UTF-8 ``txt`` member.

    The shards are written into a temporary folder beside ``out_dir`` and renamed into place at the
    end, so an interrupted run leaves no half-written shard folder. ``overwrite`` replaces a shard
    folder only (``ssl_vit.replace``): a folder of images, say, is never one; nor is one that
    is or holds a path in ``reads`` (the images being written).
    """
    index: ShardIndex | None = None

    def write(folder: Path) -> None:
        nonlocal index
        count, captions, largest_mask_label = 0, 0, -1
        with wds.ShardWriter(
            str(folder / "shard-%06d.tar"),
            maxcount=samples_per_shard,
            maxsize=max_shard_bytes,
            verbose=0,
            encoder=False,
            # An integer mtime: a float one makes every member carry a PAX header, which doubles
            # the tar parsing the loader workers do per sample.
            mtime=int(time.time()),
        ) as sink:
            for ext, data, label, *extra in samples:
                mask, caption, image_file = (*extra, None, None, None)[:3]
                sample = {"__key__": f"{count:09d}", ext: data}
                if image_file is not None:
                    sample[SOURCE_MEMBER] = json.dumps({"source": image_file}).encode()
                if label is not None:
                    sample["cls"] = str(label).encode()
                if mask is not None:
                    sample[MASK_MEMBER] = mask
                    if mask_classes is None:
                        largest_mask_label = max(largest_mask_label, _largest_label(mask))
                if caption is not None:
                    sample[CAPTION_MEMBER] = caption.encode() if isinstance(caption, str) else caption
                    captions += bool(sample[CAPTION_MEMBER].strip())  # the reader skips an empty one
                sink.write(sample)
                count += 1
        shards = sorted(p.name for p in folder.glob("shard-*.tar"))
        mask_names = mask_classes
        if mask_names is None and largest_mask_label >= 0:
            mask_names = [str(i) for i in range(largest_mask_label + 1)]
        index = ShardIndex(count, list(classes), shards, source, mask_names, captions)
        (folder / INDEX_FILE).write_text(json.dumps(asdict(index), indent=1))

    replace_output(out_dir, write, SHARD_FOLDER, overwrite, reads)
    return index


class NoImages(UserError):
    """A folder without images: where shards could be given instead, the message says so."""


def image_files(root: Path, labelled: bool = True) -> tuple[list[str], list[tuple[str, int | None]]]:
    """Class names and the image files (paths relative to ``root``, with their class index) of an
    ImageFolder tree, one sub-folder per class; a folder without sub-folders, or with one beside
    images of its own, is unlabelled (no classes, label None; every image under it is read). A
    sub-folder without images is not a class; what is left out is said once, in one line. Not
    ``labelled``: every image under ``root``, sub-folders included, without classes. A run
    resolves its folders many times (training, evaluation, pictures): the listing is walked each
    time, and classified again only when it changed."""
    if root.is_file():
        raise UserError(f"image folder {root} is a file; give the folder that holds the images")
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    listing = _files_under(root)
    if not labelled:
        images = [path for path in listing if not _hidden(path) and extension(path) in IMAGE_EXTENSIONS]
        if images:  # without any, the folder is classified below for the message that says what it holds
            return [], [(path, None) for path in images]
    key = root.resolve()
    if key not in _indexed or _indexed[key][0] != listing:
        _indexed[key] = listing, _classify(root, listing)
    classes, files = _indexed[key][1]
    return list(classes), list(files)  # copies: callers shuffle them


#: The last listing of each image folder and its classes and files, by resolved folder.
_indexed: dict[Path, tuple[list[str], tuple[list[str], list[tuple[str, int | None]]]]] = {}


def _classify(root: Path, listing: list[str]) -> tuple[list[str], list[tuple[str, int | None]]]:
    visible = [path for path in listing if not _hidden(path)]
    images = [path for path in visible if extension(path) in IMAGE_EXTENSIONS]
    with_images = {path.split("/", 1)[0] for path in images if "/" in path}
    sub_folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not _hidden(d.name))
    classes = [name for name in sub_folders if name in with_images]
    splits = [name for name in classes if name in SPLIT_FOLDERS]
    if "train" in splits and len(splits) > 1:  # torchvision's layout, given one level too high
        other = next(name for name in splits if name != "train")
        raise UserError(
            f"{root} holds the folders {' and '.join(splits)}, a dataset's splits, not its classes; give "
            f"{root / 'train'} as the data (a val folder beside it is what runs evaluate on); `ssl-vit shards "
            f"imagefolder` writes each split apart: {root / 'train'} to OUT/train, {root / other} to OUT/{other}"
        )
    beside = [path for path in images if "/" not in path]
    if len(classes) == 1 and beside:  # one sub-folder among loose images is no class layout: read them all
        classes = []
    label = {name: i for i, name in enumerate(classes)}
    if classes:  # images beside the class folders belong to no class
        files = [(path, label[path.split("/", 1)[0]]) for path in images if "/" in path]
    else:
        files = [(path, None) for path in images]
    if not files:  # what is there instead, which may be the mistake (a folder of .heic, or of zips)
        kinds = sorted({f".{extension(path)}" if extension(path) else Path(path).name for path in visible})
        found = f"it holds {counted(len(visible), 'file')}, none an image: {first_few(kinds)}"
        unread = sorted(kind for kind in kinds if kind.lstrip(".") in UNREAD_PHOTO_EXTENSIONS)
        if unread:
            found += f"; Pillow does not read {', '.join(unread)}: convert them to JPEG or PNG"
        raise NoImages(found if visible else "it is empty")
    class_of = {os.path.realpath(root / name): name for name in classes}
    links = {name: class_of.get(os.path.realpath(root / name)) for name in sub_folders if name not in label}
    _say_what_is_left_out(root, visible, files, links)
    return classes, files


def _files_under(root: Path) -> list[str]:
    """Every file under ``root`` ('/'-separated, relative to it), in path order, through symlinked
    folders too (a dataset assembled with ``ln -s``, which torchvision's ImageFolder also follows).
    Each real folder is read once, under its shortest name (then the first by name): a link back
    up the tree or to a sibling class does not take that folder's images. Strings, not Paths: a
    folder may hold millions."""
    files, seen, level = [], {os.path.realpath(root)}, [""]
    while level:  # breadth first, so that a folder is met under its shortest name first
        below = []
        for prefix in level:
            try:
                entries = sorted(os.scandir(root / prefix), key=lambda entry: entry.name)
            except OSError:  # unreadable, or gone since it was listed: its images are not ours to read
                continue
            for entry in entries:
                if entry.is_dir():
                    real = os.path.realpath(entry.path)
                    if real not in seen:
                        seen.add(real)
                        below.append(prefix + entry.name + "/")
                else:
                    files.append(prefix + entry.name)
        level = below
    return sorted(files, key=lambda path: path.split("/"))  # Path's order: part by part


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") or part in TOOL_FOLDERS for part in relative.split("/"))


def extension(path: str) -> str:
    """A file's extension, lower case, without its dot: ``jpg`` for ``a/b.JPG``."""
    return os.path.splitext(path)[1].lower().lstrip(".")


def caption_file(image: str) -> str:
    """An image's caption file, beside it (image-text objectives): ``a/b.txt`` for ``a/b.jpg``."""
    return os.path.splitext(image)[0] + ".txt"


def _say_what_is_left_out(
    root: Path, visible: list[str], files: list[tuple[str, int | None]], left_out: dict[str, str | None]
) -> None:
    """One warning per folder and process: the files and sub-folders that are not read, and why.
    ``left_out``: each sub-folder that is no class, with the class it is a link to (or None)."""
    if not first_time_named(f"left out in {root.resolve()}"):
        return
    read = {path for path, _ in files} | {caption_file(path) for path, _ in files}
    unread = [path for path in visible if path not in read and (root / path).is_file()]
    beside = [path for path in unread if "/" not in path and extension(path) in IMAGE_EXTENSIONS]
    # captions misnamed (photo.jpg.txt), or notes; an unread image's own caption goes unsaid with it
    images = {os.path.splitext(path)[0] for path in visible if extension(path) in IMAGE_EXTENSIONS}
    texts = [path for path in unread if extension(path) == "txt" and os.path.splitext(path)[0] not in images]
    photos = [path for path in unread if extension(path) in UNREAD_PHOTO_EXTENSIONS]
    other = [path for path in unread if path not in beside and extension(path) != "txt" and path not in photos]
    parts = []
    if photos:
        kinds = sorted({f".{extension(path)}" for path in photos})
        per_folder = collections.Counter(path.rsplit("/", 1)[0] if "/" in path else "top level" for path in photos)
        where = ", ".join(f"{folder}: {n}" for folder, n in per_folder.most_common(5))
        parts.append(
            f"{counted(len(photos), 'photo')} in {', '.join(kinds)}, which Pillow does not read ({where}): "
            "convert them to JPEG or PNG to train on them"
        )
    if texts:
        parts.append(
            f"{counted(len(texts), 'text file')} beside no image of {'its' if len(texts) == 1 else 'their'} name "
            f"({first_few(texts)}; an image's caption is photo.txt beside photo.jpg)"
        )
    if other:
        kinds = sorted({Path(path).suffix.lower() or Path(path).name for path in other})
        parts.append(
            f"{counted(len(other), 'file')} that {'is not an image' if len(other) == 1 else 'are not images'} "
            f"({', '.join(kinds[:5])}{', ...' if len(kinds) > 5 else ''}: {first_few(other)})"
        )
    if beside:
        parts.append(f"{counted(len(beside), 'image')} beside the class folders, in no class ({first_few(beside)})")
    empty = [name for name, target in left_out.items() if target is None]
    links = [f"{name!r} -> {target!r}" for name, target in left_out.items() if target is not None]
    if empty:
        parts.append(f"{counted(len(empty), 'sub-folder')} without images ({', '.join(map(repr, empty[:5]))})")
    if links:
        parts.append(
            f"{counted(len(links), 'link')} to a class folder, read once under its own name ({', '.join(links[:5])})"
        )
    if parts:
        log.warning(
            "%s: left out %s; images are read from %s files", root, "; ".join(parts), "/".join(IMAGE_EXTENSIONS)
        )


def image_folder_samples(
    root: str | Path, seed: int = 0, masks: str | Path | None = None, labelled: bool = True
) -> tuple[list[str], Iterator[Sample], int]:
    """Class names, the samples and their number, of an ImageFolder tree (one sub-folder per class),
    or of a flat folder of images, or not ``labelled`` (unlabelled: no classes, no ``cls``
    members; every image, sub-folders included). An image's caption, for
    image-text objectives, is the text file beside it (``a/b.txt`` for ``a/b.jpg``), if any.

    With ``masks``, a parallel folder of label maps (8-bit PNGs of class indices, 255 = ignore as
    in VOC and mmsegmentation, the image's size): the map of ``root/a/b.jpg`` is ``masks/a/b.png``.

    Files keep their original bytes (no re-encoding) and are written in a seeded random order so
    that each shard mixes classes.
    """
    root = Path(root)
    try:
        classes, files = image_files(root, labelled)
    except NoImages as what:
        raise UserError(
            f"image folder {root} has no images ({what}): put {'/'.join(IMAGE_EXTENSIONS)} images in it, one "
            "sub-folder per class or none for unlabelled images"
        ) from None
    if masks is not None:
        masks = Path(masks)
        missing = [path for path, _ in files if not (masks / path).with_suffix(".png").is_file()]
        if missing:
            first = (masks / missing[0]).with_suffix(".png")
            raise UserError(
                f"{len(missing)} of {len(files)} images have no label map (first: {first} for {root / missing[0]}); "
                "--masks needs one PNG per image at the same relative path"
            )
    random.Random(seed).shuffle(files)

    def samples() -> Iterator[Sample]:
        unreadable = []
        for path, label in files:
            try:
                ext, data = extension(path), (root / path).read_bytes()
            except OSError as err:  # a broken link, a file gone since it was listed, not ours to read
                unreadable.append(f"{path}: {err.strerror}")
                continue
            caption_path = root / caption_file(path)  # photo.jpg's caption is photo.txt, kept as its bytes
            caption = caption_path.read_bytes() if caption_path.is_file() else None
            mask = None
            if masks is not None:
                mask_path = (masks / path).with_suffix(".png")
                mask = mask_path.read_bytes()
                _check_label_map(mask, mask_path, upright(Image.open(io.BytesIO(data))).size)
            yield ext, data, label, mask, caption, path
        if unreadable:
            images = counted(len(unreadable), "image")
            log.warning("left out %s that cannot be read (%s)", images, first_few(unreadable))

    return classes, samples(), len(files)


def caption_table_samples(
    table: str | Path, separator: str | None = None, image_key: str = "filepath", caption_key: str = "title"
) -> tuple[Iterator[Sample], int]:
    """The image + caption pairs a CSV/TSV lists, and their number, as open_clip's ``CsvDataset`` reads them (a header
    row; ``--csv-img-key filepath``, ``--csv-caption-key title``; paths relative to the table's
    folder unless absolute), unlabelled, in the table's order. The separator is a comma for
    ``.csv`` and a tab otherwise (open_clip's default), unless given. Every image is checked to
    exist before anything is written; captions are written as given (the reader skips an empty one, uncounted here).
    Each image is recorded by its path in the folder that holds them all, as a folder's images are,
    so the table's shards and that folder hold out the same images, wherever the table was read from."""
    table = Path(table)
    if not table.is_file():
        raise UserError(f"caption table {table} does not exist")
    separator = separator or ("," if table.suffix.lower() == ".csv" else "\t")
    with table.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=separator)
        missing_keys = [k for k in (image_key, caption_key) if k not in (reader.fieldnames or [])]
        if missing_keys:
            raise UserError(
                f"{table} has no {' or '.join(repr(k) for k in missing_keys)} column (its header: "
                f"{reader.fieldnames}, separator {separator!r}); name the columns with --image-key / --caption-key"
            )
        rows = [(table.parent / row[image_key], row[caption_key] or "") for row in reader]
    if not rows:
        raise UserError(f"{table} lists no images")
    missing = [path for path, _ in rows if not path.is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(rows)} images in {table} do not exist (first: {missing[0]})")
    unknown = [path for path, _ in rows if path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS]
    if unknown:
        raise UserError(f"{unknown[0]} in {table} is not a {'/'.join(IMAGE_EXTENSIONS)} image")
    files = [os.path.abspath(path) for path, _ in rows]  # links kept, as a folder's listing keeps them
    root = os.path.commonpath([os.path.dirname(file) for file in files])
    names = [Path(os.path.relpath(file, root)).as_posix() for file in files]
    samples = (
        (path.suffix.lower().lstrip("."), path.read_bytes(), None, None, caption, name)
        for (path, caption), name in zip(rows, names, strict=True)
    )
    return samples, len(rows)


def upright(img: Image.Image) -> Image.Image:
    """The image as viewers show it: a camera that stores its pixels sideways and an EXIF
    orientation tag (most phone photos) gives the image it was taken as, and a label map is taken
    to be drawn on that image. A malformed EXIF block leaves the pixels as stored."""
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # EXIF written by other tools is often broken; the pixels are still good
        return img


def _check_label_map(mask: bytes, path: Path, image_size: tuple[int, int]) -> None:
    with Image.open(io.BytesIO(mask)) as img:
        if img.mode not in ("L", "P"):
            raise UserError(f"label map {path} is {img.mode}; it must be an 8-bit PNG of class indices (mode L or P)")
        if img.size != image_size:
            raise UserError(
                f"label map {path} is {img.size[0]}x{img.size[1]}, but its image is {image_size[0]}x{image_size[1]}"
            )


def _largest_label(mask: bytes) -> int:
    """The largest class index in a label map, 255 (ignore) aside."""
    with Image.open(io.BytesIO(mask)) as img:
        values = [v for v, n in enumerate(img.histogram()[:256]) if n and v != 255]
    return max(values, default=-1)


def write_embedded_shards(
    out_root: str | Path,
    samples_per_shard: int = 250,
    seed: int = 0,
    overwrite: bool = False,
    dataset: str = "shapes",
) -> dict[str, ShardIndex]:
    """Generate an embedded dataset (``shapes`` or ``glyphs``) as ``out_root/train`` and
    ``out_root/val`` shards, each sample with its class and its label map.

    Both splits are written first, beside ``out_root``, then moved in, ``val`` before ``train``:
    a kill leaves no pair of splits of two seeds (but for the instant between the two moves), and a
    ``train`` folder always has its ``val`` (a run writes the data again when ``train`` is missing;
    a ``val`` of the same dataset and seed is then its own to replace)."""
    if dataset not in embedded.DATASETS:
        raise UserError(f"unknown embedded dataset {dataset!r}; choose one of {', '.join(embedded.DATASETS)}")
    classes = embedded.DATASETS[dataset][0]
    out_root = Path(out_root)
    sources = {split: f"ssl-vit embedded {dataset} (seed {seed}, split {split})" for split in embedded.SPLITS}
    # A val beside no train is what a write killed between its two moves left: the same data's is ours.
    orphan = not (out_root / "train").exists() and _shard_source(out_root / "val") == sources["val"]
    replaceable = {"train": overwrite, "val": overwrite or orphan}
    for split in embedded.SPLITS:  # both before writing either: a refused val must not follow a replaced train
        check_replaceable(out_root / split, SHARD_FOLDER, replaceable[split])
    out_root.mkdir(parents=True, exist_ok=True)
    recover_interrupted_replacements(out_root)  # what a killed earlier write staged
    staging = Path(tempfile.mkdtemp(prefix=f".{out_root.name}.{writer_id()}.", suffix=".partial", dir=out_root.parent))
    try:
        indexes = {
            split: write_shards(
                (
                    ("png", _png_bytes(sample.image), sample.label, _png_bytes(sample.label_map), sample.caption)
                    for sample in embedded.embedded_samples(split, seed, dataset=dataset)
                ),
                staging / split,
                classes=list(classes),
                source=sources[split],
                samples_per_shard=samples_per_shard,
                mask_classes=embedded.mask_classes(dataset),
            )
            for split in embedded.SPLITS
        }
        for split in sorted(embedded.SPLITS, key=lambda split: split == "train"):  # val, then train
            written = staging / split
            replace_output(out_root / split, lambda new, w=written: w.replace(new), SHARD_FOLDER, replaceable[split])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return indexes


def _shard_source(folder: Path) -> str | None:
    """The ``source`` a shard folder's index records, if it has one."""
    try:
        return json.loads((folder / INDEX_FILE).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class ImageFiles:
    """Image files read directly, as one "shard": a folder of images given where shards are
    expected is read in groups of these (paths relative to ``root``, with their class or None)."""

    root: str
    files: tuple[tuple[str, int | None], ...]

    def __str__(self) -> str:
        return f"{self.root} ({self.files[0][0]}...)"


@dataclass(frozen=True)
class SplitPart:
    """The samples of a shard on one side of the deterministic held-out split (see ``is_heldout``)."""

    shard: str | ImageFiles
    heldout: bool

    def __str__(self) -> str:
        return f"{self.shard} ({'held-out' if self.heldout else 'training'} part)"


#: What a recipe's shard specification resolves to: tar shard URLs, groups of image files, or
#: either one's part of the held-out split.
Shard = str | ImageFiles | SplitPart

#: A specification ending in ``#heldout`` names the held-out part of its samples, ``#train`` the
#: rest: a run given one folder of images evaluates on images it never trained on.
HELDOUT_SUFFIX, TRAIN_SUFFIX = "#heldout", "#train"
HELDOUT_FRACTION = 0.1
#: The names of a validation folder beside a ``train`` folder (torchvision's ``val``; Roboflow's and
#: Kaggle's ``valid``), in the order they are looked for; with ``test``, a dataset's split folders.
VAL_FOLDERS = ("val", "valid", "validation")
SPLIT_FOLDERS = ("train", *VAL_FOLDERS, "test")


def shard_size(num_samples: int, most: int = 1000) -> int:
    """How many samples to write per tar shard: ``most``, fewer in a small dataset, so that it is
    cut into at least ``MIN_GROUPS`` shards (why: see ``MIN_GROUPS``)."""
    return max(1, min(most, num_samples // MIN_GROUPS))


#: Image files per reader group when a folder of images is read directly (at most), and the fewest
#: groups a folder is cut into: loader workers own whole groups, in proportion to their share of an
#: epoch's batches, so a small folder needs many small groups for no worker to run out of images
#: (and repeat some) while another leaves part of its own unread.
FILES_PER_GROUP, MIN_GROUPS = 64, 64


def tar_split_key(shard: str, key: str, source: str | None) -> str:
    """What the held-out split hashes for a tar shard's sample: the file it was written from, when
    the shard says (``SOURCE_MEMBER``: a folder and its shards then hold out the same images),
    else the shard's file name and the sample's key."""
    return f"{Path(shard).name}/{key}" if source is None else source


def is_heldout(key: str) -> bool:
    """Whether the sample named ``key`` (its shard's file name and its ``__key__``, or an image's
    path in its folder) is in the held-out part: a hash, so the split is the same in every run,
    process and order of reading."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") < HELDOUT_FRACTION * 2**64


def resolve_shards(spec: str) -> tuple[list[Shard], ShardIndex | None]:
    """Shards and the index (if one is found) for a recipe's shard specification.

    ``spec`` is a folder written by ``ssl-vit shards``, a brace pattern of local tar files
    (``/data/train-{000000..000127}.tar``), remote/``pipe:`` URLs, used exactly as written
    (``pipe:aws s3 cp s3://bucket/train-{000000..000127}.tar -``), or a folder of image files
    (an ImageFolder tree, or unlabelled images), read directly in groups of up to ``FILES_PER_GROUP``.
    Any of them ending in ``#heldout`` / ``#train`` names that part of the held-out split.
    """
    spec = os.path.expanduser(spec)  # a recipe's ``~/photos``, which no shell expands
    base, part = split_part(spec)
    folder, hash_sign, name = spec.rpartition("#")
    if part is None and hash_sign and Path(folder).exists():
        parts = f"{folder}{TRAIN_SUFFIX} or {folder}{HELDOUT_SUFFIX}"
        raise UserError(f"{spec}: '#{name}' is not a part of the split; use {parts}")
    shards, index = _resolve(base)
    if part is None:
        return shards, index
    heldout = part == HELDOUT_SUFFIX
    if all(isinstance(shard, ImageFiles) for shard in shards):  # a folder of images: group the part's own files
        files = [file for shard in shards for file in shard.files if is_heldout(file[0]) == heldout]
        source = f"{index.source}, {part[1:]} part"
        return group_files(shards[0].root, files), replace(index, num_samples=len(files), source=source)
    scans = [_scans.get((url, *size_and_time(Path(url)))) for url in shards if not is_remote(url)]
    if index is not None and scans and all(scans) and len(scans) == len(shards):  # counted per key when scanned
        held = sum(scan.heldout_samples for scan in scans), sum(scan.heldout_captions for scan in scans)
        samples, captions = held if heldout else (index.num_samples - held[0], (index.captions or 0) - held[1])
        part_index = replace(index, num_samples=samples, captions=captions, source=f"{index.source}, {part[1:]} part")
        return [SplitPart(shard, heldout) for shard in shards], part_index
    if index is not None:  # the keys are in the shards: the expected share
        fraction = HELDOUT_FRACTION if heldout else 1 - HELDOUT_FRACTION
        captions = round(index.captions * fraction) if index.captions is not None else None
        index = replace(
            index,
            num_samples=round(index.num_samples * fraction),
            captions=captions,
            source=f"{index.source}, {part[1:]} part",
        )
    return [SplitPart(shard, heldout) for shard in shards], index


def _resolve(spec: str) -> tuple[list[str | ImageFiles], ShardIndex | None]:
    path = Path(spec)
    if path.is_dir():
        index = ShardIndex.read(path)
        names = index.shards if index else sorted(p.name for p in path.glob("*.tar"))
        if not names:
            nested = sorted(d.name for d in path.iterdir() if ShardIndex.read(d) is not None)
            if nested:
                raise UserError(f"{spec} holds shard folders ({', '.join(nested)}), not shards; name one of them")
            return _image_folder(path)
        urls = [str(path / name) for name in names]
    elif path.is_file() and not path.name.endswith(SHARD_SUFFIXES):
        raise UserError(
            f"{spec} is a file, not a folder of images or of tar shards; give its folder ({path.parent}) or the folder "
            "of your images"
        )
    else:
        urls = list(braceexpand(spec))
        index = None
    if not urls:
        raise UserError(f"no shards found at {spec!r}; write some with `ssl-vit shards`")
    if is_remote(urls[0]):
        return urls, index
    missing = [u for u in urls if not Path(u).is_file()]
    bare = re.sub(r"\{[^}]*\}", "", spec)  # brace groups aside: their commas are braceexpand's
    written = "a glob pattern" if any(c in bare for c in "*?") else "a list" if any(c in bare for c in ",[") else None
    if missing and written:  # what a shell or webdataset's own lists would read, neither expanded here
        raise UserError(
            f"{spec} is {written}, which is not expanded here: give the folder that holds the tar files, or a brace "
            "pattern (shards-{000..007}.tar)"
        )
    if urls == [spec] and missing and not spec.endswith(SHARD_SUFFIXES):
        raise UserError(
            f"{spec} does not exist: give a folder of images (one sub-folder per class, or none) or of shards "
            "written by `ssl-vit shards`"
        )
    if missing:
        raise UserError(
            f"{len(missing)} of {len(urls)} shards of {spec!r} are missing (first: {missing[0]}); "
            "check the path, or write shards with `ssl-vit shards`"
        )
    index = ShardIndex.read(Path(urls[0]).parent)
    if index and sorted(index.shards) != sorted(Path(u).name for u in urls):
        # a part of the folder: its classes and label-map classes as the folder's index names them, its own counts
        return urls, replace(scanned_index(urls, spec), classes=index.classes, mask_classes=index.mask_classes)
    return urls, index or scanned_index(urls, spec)


def scanned_index(urls: list[str], spec: str) -> ShardIndex:
    """What ``dataset.json`` would say of local tar shards written without one (a user's own
    tar files or webdataset writer): their samples, captions and classes, read from the tar
    headers and ``cls`` members (once per file as it is now). ``cls`` holds an integer class
    index, as ``ssl-vit shards imagefolder`` writes it; the classes are named by their index."""
    scans = [_scan_shard(url) for url in urls]
    labels = sorted({label for scan in scans for label in scan.labels})
    dotted = next((scan.dotted for scan in scans if scan.dotted), None)
    if dotted:
        count = sum(scan.dotted_images for scan in scans)
        why = (
            f"{counted(count, 'image')} of {spec} {'has a name' if count == 1 else 'have names'} with more than one "
            f"dot (first: {dotted}), which webdataset does not read as images: it keys a sample by its name up to "
            f"the first dot, so the member is '.{Path(dotted).name.split('.', 1)[1]}'; rename them"
        )
        if not any(scan.samples for scan in scans):
            raise UserError(why)
        if first_time_named(f"dotted in {spec}"):
            log.warning("%s", why)
    if not any(scan.samples for scan in scans):
        raise UserError(f"{spec} holds no image members ({', '.join(IMAGE_EXTENSIONS)}) in its tar files")
    not_index = next((scan.not_index for scan in scans if scan.not_index), None)
    if not_index and not labels:  # all of them: the evaluation's line on missing labels names it
        _names_as_labels[spec] = not_index
    elif not_index and first_time_named(f"not an index in {spec}"):
        log.warning(
            "%s has cls members that are not class indices (first: %s), read as no label: k-NN and the probes need an "
            "integer cls per labelled image (`ssl-vit shards imagefolder` writes them from one sub-folder per class)",
            spec,
            not_index,
        )
    largest_mask_label = max(scan.largest_mask_label for scan in scans)
    return ShardIndex(
        num_samples=sum(scan.samples for scan in scans),
        classes=[str(label) for label in range(labels[-1] + 1)] if labels else [],
        shards=[Path(url).name for url in urls],
        source=f"tar shards {spec}",
        mask_classes=[str(i) for i in range(largest_mask_label + 1)] if largest_mask_label >= 0 else None,
        captions=sum(scan.captions for scan in scans),
    )


@dataclass(frozen=True)
class _ShardScan:
    samples: int  # keys with an image member
    captions: int
    labels: frozenset[int]
    not_index: str | None  # the first cls that is no integer
    dotted: str | None  # the first image member whose name has more dots than webdataset's key allows
    dotted_images: int
    largest_mask_label: int  # in the label maps (seg.png), -1 without any
    heldout_samples: int  # in the held-out part of the split (``is_heldout``)
    heldout_captions: int


#: Each scanned shard's counts, by its path, size and modification time: a run resolves its data many times.
_scans: dict[tuple[str, int, int], _ShardScan] = {}
#: Shards whose every cls is a name, not a class index, and the first such name.
_names_as_labels: dict[str, str] = {}


def val_labels_as_train(train_classes: list[str], val_classes: list[str]) -> list[int] | None:
    """Train's label of each of val's classes, by name: a label is a class's place in its own
    split's list, so a val set without some of train's classes (a class with no val images)
    numbers the others differently. None when every val label is train's already; val's classes
    must all be train's (:func:`classes_only_in_val`)."""
    labels = [train_classes.index(name) for name in val_classes]
    return None if labels == list(range(len(labels))) else labels


def classes_only_in_val(train_classes: list[str], val_classes: list[str]) -> list[str]:
    return [name for name in val_classes if name not in train_classes]


def relabelled(labels: torch.Tensor, train_labels: list[int] | None) -> torch.Tensor:
    """Val's ``labels`` as train's (``val_labels_as_train``); those without a class (-1) as they are."""
    if train_labels is None:
        return labels
    mapped = torch.tensor(train_labels, dtype=labels.dtype, device=labels.device)[labels.clamp(min=0)]
    return torch.where(labels >= 0, mapped, labels)


def names_as_labels(spec: str) -> str | None:
    """The first of the class names that the scanned tar shards ``spec`` hold as their ``cls``
    members instead of class indices (None when they hold indices, or none)."""
    return _names_as_labels.get(spec)


def _scan_shard(url: str) -> _ShardScan:
    key = (url, *size_and_time(Path(url)))
    if key in _scans:
        return _scans[key]
    images, captions, labels, sources = set(), set(), set(), {}
    not_index, dotted, dotted_images, largest_mask_label = None, None, 0, -1
    try:
        with tarfile.open(url, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                prefix, suffix = base_plus_ext(member.name) or (None, None)
                suffix = (suffix or "").lower()
                if suffix in IMAGE_EXTENSIONS:
                    images.add(prefix)
                elif suffix == CAPTION_MEMBER:
                    captions.add(prefix)
                elif suffix == "cls":
                    value = tar.extractfile(member).read(64)
                    try:
                        labels.add(int(value))
                    except ValueError:
                        not_index = not_index or f"{value[:20].decode(errors='replace').strip()} in {Path(url).name}"
                elif suffix == SOURCE_MEMBER:  # the file an ssl-vit shard's sample was written from
                    with contextlib.suppress(KeyError, TypeError, ValueError):  # a json member of the user's own
                        sources[prefix] = str(json.loads(tar.extractfile(member).read(1 << 16))["source"])
                elif suffix == MASK_MEMBER:
                    largest_mask_label = max(largest_mask_label, _largest_label(tar.extractfile(member).read()))
                elif suffix.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
                    dotted, dotted_images = dotted or member.name, dotted_images + 1
    except (tarfile.TarError, OSError, EOFError):  # what is left unread is the reader's to skip and count
        pass
    held = {key for key in images if is_heldout(tar_split_key(url, key, sources.get(key)))}
    scan = _ShardScan(
        len(images),
        len(captions & images),
        frozenset(labels),
        not_index,
        dotted,
        dotted_images,
        largest_mask_label,
        len(held),
        len(captions & held),
    )
    _scans[key] = scan
    return scan


def _image_folder(root: Path) -> tuple[list[str | ImageFiles], ShardIndex]:
    try:
        classes, files = image_files(root)
    except NoImages as what:
        train = root.parent / "train"  # runs evaluate on a val folder beside train: an empty one too
        beside = (
            f"; or remove it, and runs evaluate on the held-out tenth of {train}"
            if root.name in VAL_FOLDERS and train.is_dir()
            else ""
        )
        raise UserError(
            f"no shards found at {str(root)!r}, nor images ({what}): write shards there with `ssl-vit shards`, or put "
            f"{'/'.join(IMAGE_EXTENSIONS)} images in it (one sub-folder per class, or none for unlabelled images)"
            f"{beside}"
        ) from None
    random.Random(0).shuffle(files)  # each group mixes classes
    return group_files(str(root), files), ShardIndex(len(files), classes, [], f"image folder {root}")


def group_files(root: str, files: list[tuple[str, int | None]]) -> list[str | ImageFiles]:
    """A folder's image files (paths relative to ``root``, with their class) as reader groups."""
    size = shard_size(len(files), most=FILES_PER_GROUP)
    return [ImageFiles(root, tuple(files[i : i + size])) for i in range(0, len(files), size)]


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def check_reachable(url: str, timeout: float = 20.0) -> None:
    """Stop in one line when an http(s) shard cannot be reached (no network, a wrong host or
    name): webdataset's curl would retry every shard for minutes, run after run."""
    if not url.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError as err:  # the server answered: only "not found" is the user's to fix
        if err.code in (404, 410):
            raise UserError(f"{url} does not exist on its server (HTTP {err.code}); check the address") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"cannot reach {url} ({reason}): no network from this machine, or a wrong address; copy the shards "
            "here and give their folder, or check the address"
        ) from None


def data_location(spec: str) -> str:
    """Where a shard specification points, whatever folder it was given from: a local path made
    absolute with its links resolved (``photos``, ``./photos/`` and ``/home/me/photos`` are one),
    its ``#part`` kept; remote URLs as written."""
    spec = os.path.expanduser(spec)
    if is_remote(spec):
        return spec
    base, part = split_part(spec)
    return os.path.realpath(base) + (part or "")


def data_fingerprint(spec: str) -> str:
    """A hash of what a shard specification reads now: the part of the split it names, and each
    local file's (and image's caption file's) name within its folder, size and modification time
    (remote URLs as written), so that data added, removed or rewritten since gives another hash,
    and the same files moved elsewhere the same one."""
    shards, _ = resolve_shards(spec)
    entries: list[object] = [split_part(spec)[1]]
    for shard in shards:
        files = shard.shard if isinstance(shard, SplitPart) else shard
        if isinstance(files, ImageFiles):
            root = Path(files.root)
            for name, label in files.files:
                entries.append((name, label, *_size_and_time_or_gone(root / name)))
                caption = root / caption_file(name)
                if caption.is_file():  # what an image-text objective reads with the image
                    entries.append((caption_file(name), *size_and_time(caption)))
        elif is_remote(files):
            entries.append(files)
        else:
            entries.append((os.path.basename(files), *size_and_time(Path(files))))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def size_and_time(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _size_and_time_or_gone(path: Path) -> tuple[int | None, int | None]:
    """A listed image's size and time; (None, None) for a broken link or a file gone since it was
    listed, which the loader skips as unreadable and names."""
    try:
        return size_and_time(path)
    except FileNotFoundError:
        return None, None


def split_part(spec: str) -> tuple[str, str | None]:
    """A shard specification without its part of the held-out split, and that part
    (``#train`` / ``#heldout``, or None)."""
    part = next((suffix for suffix in (HELDOUT_SUFFIX, TRAIN_SUFFIX) if spec.endswith(suffix)), None)
    return (spec.removesuffix(part) if part else spec), part
