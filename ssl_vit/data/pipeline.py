"""The streaming input pipeline: WebDataset tar shards -> decoded images and labels -> the
objective's views, in DataLoader workers.

Shards are split across (rank, worker) readers so no two readers open the same shard; shard order
is a permutation keyed on (seed, epoch), identical on every rank. Only image, ``cls`` and ``json``
members are ever read, and none is unpickled. Images in any mode (CMYK, palette, 16-bit, alpha)
become RGB; a sample that does not decode is skipped and counted, not a crash, and each epoch's
count is logged. When more than ``max_skip_fraction`` of what was read is broken, the run stops
with a message instead of training on the remnant. An image declaring more than
``max_image_pixels`` is skipped the same way, from its header, before it is decoded.

The training loader resumes exactly, mid-epoch included: its state in a checkpoint is the epoch
and the number of batches it had yielded, and every augmentation a worker draws is seeded by its
reader and batch position, so the rest of the epoch is the uninterrupted run's, bit for bit (see
``EpochLoader``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import tv_tensors

from ssl_vit.data.shards import (
    CAPTION_MEMBER,
    HELDOUT_SUFFIX,
    IMAGE_EXTENSIONS,
    MASK_MEMBER,
    SOURCE_MEMBER,
    TRAIN_SUFFIX,
    VAL_FOLDERS,
    ImageFiles,
    Sample,
    Shard,
    ShardIndex,
    SplitPart,
    caption_file,
    check_reachable,
    data_location,
    extension,
    group_files,
    is_heldout,
    is_remote,
    resolve_shards,
    split_part,
    tar_split_key,
    upright,
    write_embedded_shards,
)
from ssl_vit.errors import UserError, counted, first_few, first_time_named

log = logging.getLogger(__name__)

READ_EXTENSIONS = frozenset((*IMAGE_EXTENSIONS, "cls", "json", MASK_MEMBER, CAPTION_MEMBER))
#: A caption -> its token ids, and whether they were cut to the context (CLIP's ``CaptionTokens``).
CaptionTokenizer = Callable[[str], tuple[torch.Tensor, bool]]
NO_LABEL = -1
UNREADABLE = "__unreadable__"  # why an image file of a folder could not be read, in its sample
IGNORE_PIXEL = -100  # a label map's 255 ("ignore", as VOC and mmsegmentation mark it), as cross-entropy skips it

View = Callable[[Image.Image], Any]
#: A dataset names the first few samples it skips, each only the first time this run meets it
#: (every epoch and every evaluation reads the same files again); epoch summaries count them all.
SKIPS_LOGGED = 5
#: The skip fraction is judged only once this many samples were skipped (one bad file is not "mostly broken").
MIN_SKIPS_TO_JUDGE = 10
#: Images declaring more pixels are skipped before decoding, for pretraining and evaluation alike:
#: above a 61-megapixel full-frame camera photo (9504 x 6336), below PIL's own decompression-bomb
#: warning (89 megapixels), and at most 192 MB of RGB per image in each loader worker.
MAX_IMAGE_PIXELS = 64_000_000
#: Sides further apart than this are no picture a view can use: the evaluation view resizes the
#: short side to its crop's, so a 3 KB PNG of 1,000,000 x 1 became 36,000,000 x 36 pixels (7 GB).
MAX_ASPECT_RATIO = 100


class CorruptSample(Exception):
    """A shard member that cannot be decoded into an image (and label)."""


def decode_sample(
    sample: dict[str, Any], min_side: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[Image.Image, int]:
    """An RGB image, upright (see ``upright``), and its integer class (``NO_LABEL`` when the sample
    has no ``cls``, or one that is not an integer).

    An image whose header declares more than ``max_pixels``, or sides more than ``MAX_ASPECT_RATIO``
    to 1, is not decoded (a 12000 x 12000 PNG takes hundreds of megabytes however small its file):
    it is a ``CorruptSample``. PIL refuses images above its own limit, twice its
    ``MAX_IMAGE_PIXELS``, whatever ``max_pixels`` says.

    With ``min_side``, a JPEG is decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale whose short
    side is still at least ``min_side`` (libjpeg's scaled IDCT, PIL's draft mode): a 4000 x 3000
    photo decodes at 1/4 size when the view needs 600 px, several times faster, and the crops lose
    nothing because no crop of the view is ever taken from fewer than ``min_side`` pixels."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise CorruptSample(sample.get(UNREADABLE, f"no image member (one of {', '.join(IMAGE_EXTENSIONS)})"))
    if not sample[ext]:
        raise CorruptSample(f"{ext} is an empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # max_pixels is checked below, with what to do about it: PIL's own warning would repeat it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(sample[ext])) as img:  # reads the header only
                width, height = img.size
                if width * height > max_pixels:
                    raise CorruptSample(
                        f"{ext} is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than "
                        f"max_image_pixels = {max_pixels} (data.max_image_pixels in a recipe)"
                    )
                if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
                    raise CorruptSample(
                        f"{ext} is {width}x{height}: its sides differ by more than {MAX_ASPECT_RATIO} to 1, which the "
                        "evaluation view would enlarge to its crop's short side; crop it"
                    )
                if min_side:
                    img.draft("RGB", (min_side, min_side))  # a no-op for formats other than JPEG
                image = to_rgb(upright(img))
    except CorruptSample:
        raise
    except Exception as err:
        # PIL names the buffer it read from ("<_io.BytesIO object at 0x...>"), which says nothing here
        raise CorruptSample(
            f"undecodable {ext}: {re.sub(r' ?<_io.BytesIO object at 0x[0-9a-f]+>', '', str(err))}"
        ) from err
    try:  # a cls that is no class index is no label: the image is as good (its shards' scan says so once)
        return image, int(sample["cls"]) if "cls" in sample else NO_LABEL
    except ValueError:
        return image, NO_LABEL


def decodable_samples(samples: Iterable[Sample]) -> Iterator[Sample]:
    """The samples whose image decodes as the loader decodes it; the others are left out of the
    shards being written, and named in one line at the end (found once, not skipped every epoch).
    Images over ``MAX_IMAGE_PIXELS`` are written (a recipe may raise ``data.max_image_pixels``),
    and named in a line of their own: with the default, every run skips them."""
    broken, large = [], []
    for sample in samples:
        name = sample[5] if len(sample) > 5 else "an image"
        try:  # at an eighth of a JPEG's size: enough to find a broken file, a fraction of the work
            decode_sample({sample[0]: sample[1]}, min_side=64, max_pixels=sys.maxsize)
        except CorruptSample as err:
            broken.append(f"{name}: {err}")
            continue
        with Image.open(io.BytesIO(sample[1])) as img:  # the header: decode_sample's image is reduced
            if img.width * img.height > MAX_IMAGE_PIXELS:
                large.append(f"{name}: {img.width}x{img.height}")
        yield sample
    if broken:
        log.warning("left out %s that the loader would skip (%s)", counted(len(broken), "image"), first_few(broken))
    if large:
        log.warning(
            "wrote %s of more than %d megapixels (%s), which runs skip unless a recipe raises data.max_image_pixels; "
            "shrink them to train and evaluate on them",
            counted(len(large), "image"),
            MAX_IMAGE_PIXELS // 1_000_000,
            first_few(large),
        )


def no_sample_read(shards: list[Shard]) -> str:
    """Why a reader got no sample from its shards: most often, data moved while the run read it."""
    places = [str(s.root if isinstance(s, ImageFiles) else s) for s in (getattr(s, "shard", s) for s in shards)]
    gone = sorted({place for place in places if not is_remote(place) and not os.path.exists(place)})
    if gone:
        return (
            f"{first_few(gone)} no longer exist{'s' if len(gone) == 1 else ''}: moved or renamed while the run read "
            "it; put it back and run the same command again (it resumes from the run's last checkpoint)"
        )
    return f"no readable sample in {first_few(sorted(set(places)))}; check the shards' contents"


def sample_name(sample: dict[str, Any], shard: Shard) -> str:
    """How a skipped sample is named to the user: an image file by its path, else key and shard,
    and the file the shard's sample was written from, when the shard says."""
    key, files = sample.get("__key__"), shard.shard if isinstance(shard, SplitPart) else shard
    if isinstance(files, ImageFiles):
        return str(Path(files.root) / str(key))
    source = sample_source(sample)
    return f"sample {key} of {shard}" if source is None else f"{source} (sample {key} of {shard})"


def split_key(sample: dict[str, Any], shard: str | ImageFiles) -> str:
    """What the held-out split hashes for a sample: its image's path in the folder, which shards
    written from a folder keep (so a folder and its shards hold out the same images), else its
    shard's file name and key."""
    if isinstance(shard, ImageFiles):
        return sample["__key__"]
    return tar_split_key(shard, sample["__key__"], sample_source(sample))


def sample_source(sample: dict[str, Any]) -> str | None:
    """The file a shard's sample was written from, when the shard says (``SOURCE_MEMBER``)."""
    try:
        return str(json.loads(sample[SOURCE_MEMBER])["source"])
    except (KeyError, TypeError, ValueError):  # no such member, or not ours
        return None


def decode_caption(sample: dict[str, Any]) -> str:
    """A sample's caption: its ``txt`` member as UTF-8 text, surrounding whitespace removed."""
    if CAPTION_MEMBER not in sample:
        raise CorruptSample("no caption (.txt member)")
    try:
        caption = sample[CAPTION_MEMBER].decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise CorruptSample(f"caption is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not caption:
        raise CorruptSample("empty caption")
    return caption


def decode_mask(sample: dict[str, Any], size: tuple[int, int]) -> tv_tensors.Mask:
    """A sample's label map (``seg.png``: one class index per pixel, 255 = ignore) as an (H, W)
    int64 mask, 255 mapped to ``IGNORE_PIXEL``; it must be the image's ``size``."""
    if MASK_MEMBER not in sample:
        raise CorruptSample(f"no {MASK_MEMBER} label map (dense probes need one per image)")
    try:
        with Image.open(io.BytesIO(sample[MASK_MEMBER])) as img:
            if img.mode not in ("L", "P"):
                raise CorruptSample(f"{MASK_MEMBER} is {img.mode}, not an 8-bit map of class indices (L or P)")
            if img.size != size:  # from the header: a map larger than its (size-capped) image is never decoded
                raise CorruptSample(f"{MASK_MEMBER} is {img.width}x{img.height}, the image {size[0]}x{size[1]}")
            labels = torch.from_numpy(np.asarray(img, dtype=np.int64).copy())
    except CorruptSample:
        raise
    except Exception as err:
        raise CorruptSample(f"undecodable {MASK_MEMBER}: {err}") from err
    labels[labels == 255] = IGNORE_PIXEL
    return tv_tensors.Mask(labels)


def to_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB image from any mode: 16/32-bit greyscale is scaled (not clipped) to 8 bits, 32-bit
    float greyscale taken as 0..1 or, when its values go beyond, stretched from its least to its most, and
    transparency is composited onto white (rather than dropped, which shows whatever colour the
    transparent pixels happen to hold)."""
    if img.mode.startswith("I"):  # I;16, I;16B, I (16-bit PNGs): 0..65535
        img = Image.fromarray((np.asarray(img, dtype=np.float32) / 256).clip(0, 255).astype(np.uint8))
    elif img.mode == "F":  # 32-bit float TIFFs: 0..1 by convention (scikit-image's), else stretched
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = (0.0, 1.0) if values.min() >= 0 and values.max() <= 1 else (values.min(), values.max())
        img = Image.fromarray((255 * (values - low) / max(high - low, 1e-12)).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class ShardDataset(IterableDataset):
    """Samples of a list of shard URLs, transformed by ``view``; yields ``(view(image), label)``,
    with ``masks`` ``view(image, label_map)`` (the view transforms both alike: see
    :func:`decode_mask`), or with ``captions`` ``(view(image), token ids)``: each sample's
    caption tokenised in the worker; a sample without a readable caption is skipped and counted
    like a corrupt image, a caption longer than the context is cut and counted.

    Images are decoded at reduced size when the view says how many pixels it needs (its
    ``decode_side``; see ``decode_sample``), and not at all when they declare more than
    ``max_image_pixels``.

    With ``batches_per_epoch`` set, each rank yields exactly that many batches of ``batch_size``
    per epoch (its readers cycle over their shards as needed), so every rank steps the same number
    of times and no collective hangs at the end of an epoch. Without it, each shard is read once
    (evaluation).

    Each DataLoader worker plays one reader *role*: the shards, shuffle and share of the epoch's
    batches of one of the epoch's ``num_workers`` readers. The loader takes batches from workers
    0, 1, ... in turn, so batch ``j`` of an epoch is role ``j % num_workers``'s. An epoch started
    at batch ``start_batch`` (a resume) rotates the roles, so that worker 0 plays the role whose
    batch comes next, and each role first reads (and decodes, so skips are counted as before) the
    samples of the batches it had already made, without running the view on them. In a worker,
    the torch, Python and NumPy generators the view draws from are seeded at each batch from
    (seed, epoch, rank, role, batch), so a role's batches are the same however it got there.
    """

    def __init__(
        self,
        urls: list[Shard],
        view: View,
        batch_size: int = 1,
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 0,
        shuffle_shards: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        masks: bool = False,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        captions: CaptionTokenizer | None = None,
    ) -> None:
        super().__init__()
        self.urls = list(urls)
        self.view = view
        self.masks = masks
        self.captions = captions
        self.max_image_pixels = max_image_pixels
        # A label map is decoded at full size, so its image must be too.
        self.decode_side: int | None = None if masks else getattr(view, "decode_side", None)
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0  # the epoch's first batch: > 0 when a run resumes mid-epoch
        # Shared with the workers, which count what they read and skip; reset at each epoch's start.
        self.read = mp.Value("l", 0)
        self.read_again = mp.Value("l", 0)  # by passes after a reader's first (see _cycle)
        self.skipped = mp.Value("l", 0)
        self.uncaptioned = mp.Value("l", 0)  # samples an image-text objective leaves out: they are not pairs
        self.truncated = mp.Value("l", 0)
        self.skips_logged = mp.Value("l", 0)  # shared by the workers
        self._last_summary: str | None = None  # the epoch line as last said: the same again is not a warning
        self._shard: Shard | None = None  # the shard being read, and whether it failed
        self._shard_failed = False

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a single-pass ShardDataset has no length")
        return self.batches_per_epoch * self.batch_size

    def reader_shards(self, role: int, num_workers: int) -> list[str]:
        """The shards one (rank, role) reader owns this epoch: disjoint from every other reader's.
        In training, each reader's share of the shards follows its share of the epoch's batches (3
        batches over 2 workers: 2 and 1), so that a small folder is not read twice by one reader
        while another leaves part of its own unread."""
        shards = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(shards)
        reader, readers = self.rank * num_workers + role, self.world_size * num_workers
        if self.batches_per_epoch is None:
            return shards[reader::readers]
        shares = [role_batches(self.batches_per_epoch, r % num_workers, num_workers) for r in range(readers)]
        counts = shard_counts(shares, len(shards))
        start = sum(counts[:reader])
        return shards[start : start + counts[reader]]

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        info = get_worker_info()
        if info is not None:
            # Ctrl-C at a terminal, and a SIGTERM to the process group (timeout, Slurm's scancel), are the
            # main process's: it ends its step, which reads this worker, saves it and stops the workers
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        role = (worker + self.start_batch) % num_workers
        reader = f"{self.seed}:{self.epoch}:{self.rank}:{role}"
        shards = self.reader_shards(role, num_workers)
        batches_made = 0
        if self.batches_per_epoch is None:
            samples = self._shuffled(self._read(shards), reader)
        else:  # this role's exact share of the epoch's batches
            share = role_batches(self.batches_per_epoch, role, num_workers)
            samples = self._cycle(shards, reader, share * self.batch_size)
            batches_made = role_batches(self.start_batch, role, num_workers)
            # Past the samples of the batches this role made before a resume: read and decoded, not viewed.
            collections.deque(itertools.islice(samples, batches_made * self.batch_size), maxlen=0)
        begin_batch = getattr(self.view, "start_batch", None)
        for i, (image, target) in enumerate(samples):
            if i % self.batch_size == 0:
                role_batch = batches_made + i // self.batch_size
                # Only in a worker: in the training process the view draws from the run's
                # generators, which checkpoints save and restore.
                if info is not None:
                    seed_generators(f"{reader}:{role_batch}")
                # A view that settles something per batch (MixedResolutionViews' crop sizes) is
                # told the batch's place in the epoch, the same on every rank.
                if begin_batch is not None:
                    begin_batch(f"{self.seed}:{self.epoch}:{role + num_workers * role_batch}")
            yield self.view(image, target) if self.masks else (self.view(image), target)

    def _shuffled(self, samples: Iterator[Any], key: str, buffer: int | None = None) -> Iterator[Any]:
        buffer = self.shuffle_buffer if buffer is None else buffer
        if buffer <= 1:
            return samples
        return wds.shuffle(buffer, buffer, rng=random.Random(key))(samples)

    def _cycle(self, shards: list[str], reader: str, total: int) -> Iterator[tuple[Image.Image, int]]:
        """``total`` samples: a pass over the shards, then as many passes as a reader whose shards
        are a little short of its batches (unreadable images, a split that is not even) needs to
        top them up. The samples it takes again are counted apart: they were read and judged in the
        first pass."""
        # Each pass is shuffled on its own: a buffer larger than a small folder would otherwise hold
        # copies of its images from the next passes, and put them in one batch. A top-up's buffer
        # is what it lacks, so that it decodes about that many images, not a buffer's worth.
        taken = 0
        for n_pass in itertools.count():
            if taken == total:  # a reader with no batches this epoch reads nothing
                return
            order = list(shards)
            random.Random(f"{reader}:{n_pass}").shuffle(order)
            got_any = False
            buffer = self.shuffle_buffer if n_pass == 0 else min(self.shuffle_buffer, total - taken)
            for sample in self._shuffled(self._read(order, again=n_pass > 0), f"{reader}:{n_pass}", buffer):
                got_any = True
                if n_pass > 0:
                    with self.read_again.get_lock():
                        self.read_again.value += 1
                yield sample
                taken += 1
                if taken == total:
                    return
            if not got_any:
                raise UserError(no_sample_read(shards))

    def _read(self, shards: list[Shard], again: bool = False) -> Iterator[tuple[Image.Image, int]]:
        for shard in shards:
            self._shard, self._shard_failed = shard, False
            for sample in self._samples(shard):
                if not again:
                    with self.read.get_lock():
                        self.read.value += 1
                if self.captions and CAPTION_MEMBER not in sample and UNREADABLE not in sample:
                    if not again:
                        with self.uncaptioned.get_lock():
                            self.uncaptioned.value += 1
                    continue
                try:
                    image, label = decode_sample(sample, self.decode_side, self.max_image_pixels)
                    if self.masks:
                        yield image, decode_mask(sample, image.size)
                    else:
                        yield image, self._tokens(sample, count=not again) if self.captions else label
                except CorruptSample as err:
                    if not again:
                        name = sample_name(sample, shard)
                        self._count_skip(name, f"{name}: {err}")

    def _tokens(self, sample: dict[str, Any], count: bool = True) -> torch.Tensor:
        tokens, cut = self.captions(decode_caption(sample))
        if cut and count:
            with self.truncated.get_lock():
                self.truncated.value += 1
        return tokens

    def first_sample(self) -> dict[str, Any]:
        """The first shard's first sample as a webdataset dict, undecoded ({} when there is none):
        what shards without an index hold (captions, label maps)."""
        return next(self._samples(self.urls[0]), {}) if self.urls else {}

    def _samples(self, shard: Shard) -> Iterator[dict[str, Any]]:
        """A shard's samples as webdataset dicts (``__key__``, image member, ``cls``...), undecoded."""
        if isinstance(shard, SplitPart):
            yield from (s for s in self._samples(shard.shard) if is_heldout(split_key(s, shard.shard)) == shard.heldout)
        elif isinstance(shard, ImageFiles):
            for path, label in shard.files:
                sample: dict[str, Any] = {"__key__": path}
                try:
                    sample[extension(path)] = (Path(shard.root) / path).read_bytes()
                except OSError as err:  # a broken link, a file gone or not ours: skipped and named once
                    sample[UNREADABLE] = f"cannot read the file ({err.strerror})"
                if label is not None:
                    sample["cls"] = str(label).encode()
                caption = Path(shard.root) / caption_file(path)
                if self.captions and caption.is_file():
                    sample[CAPTION_MEMBER] = caption.read_bytes()
                yield sample
        else:
            members = wds.tarfile_to_samples(handler=self._on_shard_error, select_files=self._is_read_member)
            yield from members([{"url": shard}])

    def _on_shard_error(self, err: Exception) -> bool:
        # webdataset reports one broken tar stream at several levels: count it once per shard.
        if not self._shard_failed:
            self._shard_failed = True
            # webdataset adds its stream objects to the error's message and arguments: the reason alone
            reason = str(err.args[0] if err.args and isinstance(err.args[0], str) else err).split(" @ <")[0]
            what = f"unreadable data in {self._shard} ({type(err).__name__}: {reason}); the rest of that shard is lost"
            self._count_skip(str(self._shard), what)
        return True

    def _count_skip(self, name: str, what: str) -> None:
        with self.skipped.get_lock():
            self.skipped.value += 1
        if not first_time_named(name):
            return
        with self.skips_logged.get_lock():
            if self.skips_logged.value >= SKIPS_LOGGED:
                return
            self.skips_logged.value += 1
        log.warning("skipped %s", what)

    def _is_read_member(self, name: str) -> bool:
        """Read only image, class and JSON members; anything else (``.pyd``, ``.pickle``...) is
        never read, so it can never be unpickled."""
        ext = Path(name).name.split(".", 1)[-1].lower()
        if ext in READ_EXTENSIONS:
            return True
        # once a run, in whichever loader worker meets it first; members named with more dots
        # (IMG.2023.jpg, IMG.2023.cls) were said when the shards were resolved
        dotted = ext.rsplit(".", 1)[-1] in READ_EXTENSIONS
        if not dotted and first_time_named(f"ignoring .{ext}"):
            log.warning("ignoring .%s members (first: %s): ssl-vit reads only images, cls, txt and json", ext, name)
        return False

    @functools.cached_property
    def fingerprint(self) -> str:
        """The shards and the files in them, in order: a folder's images added or removed change it."""
        return hashlib.sha256(repr(self.urls).encode()).hexdigest()[:16]

    def start_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Read ``epoch`` from its batch ``start_batch`` on; the counts start again from zero
        (the samples of the batches before ``start_batch`` are read again, and counted)."""
        self.epoch = epoch
        self.start_batch = start_batch
        for counter in (self.read, self.read_again, self.skipped, self.uncaptioned, self.truncated):
            counter.value = 0

    def check_skips(self, max_fraction: float) -> None:
        """Stop when the data is mostly broken rather than train on what is left of it."""
        skipped, read = self.skipped.value, self.read.value
        if skipped >= MIN_SKIPS_TO_JUDGE and skipped > max_fraction * max(read, 1):
            raise UserError(
                f"{skipped} of the {read} samples read so far in epoch {self.epoch} were unreadable "
                f"(more than data.max_skip_fraction = {max_fraction}); the log names the first ones. "
                "Check or rewrite the shards, or raise data.max_skip_fraction"
            )

    def log_epoch_summary(self) -> None:
        skipped, read, cut = self.skipped.value, self.read.value, self.truncated.value
        captions = f", cut {counted(cut, 'caption')} to the text context" if self.captions else ""
        if self.uncaptioned.value:
            captions = f", left out {self.uncaptioned.value} without a caption{captions}"
        again = self.read_again.value
        # one reader short of its batches reads some of its samples again; say so, with the count apart
        topped_up = f"; read {again} of them again to fill the epoch's batches" if again else ""
        summary = f"read {read} samples, {skipped} of them skipped{captions}{topped_up}"
        # A warning when there is something to see, once: every epoch of a run over the same data says the same.
        report = log.warning if (skipped or cut) and summary != self._last_summary else log.info
        self._last_summary = summary
        report("epoch %d: %s", self.epoch, summary)


def eval_loader(urls: list[Shard], view: View, batch_size: int, num_workers: int = 2, **options: Any) -> DataLoader:
    """One pass over every sample of ``urls`` in a fixed order, through ``view``: what the
    evaluations read. ``options`` go to :class:`ShardDataset` (masks, captions, a seeded shuffle)."""
    dataset = ShardDataset(urls, view, **{"shuffle_shards": False, **options})
    return DataLoader(dataset, batch_size=batch_size, num_workers=min(num_workers, len(urls)))


def captioned_only(urls: list[Shard], index: ShardIndex | None) -> tuple[list[Shard], ShardIndex | None]:
    """The training data of an image-text objective: a folder's images that have a caption beside
    them (open_clip's loader drops samples without one too), or shards whose epoch is sized by
    their captioned samples; how many are left out is said once. Samples without a caption are
    left out as they are read, and counted apart from unreadable ones."""
    if index is None or not index.num_samples:
        return urls, index
    kept = urls
    if all(isinstance(shard, ImageFiles) for shard in urls):
        root = urls[0].root
        files = [f for shard in urls for f in shard.files if (Path(root) / caption_file(f[0])).is_file()]
        captions, kept = len(files), (group_files(root, files) if files else urls)
    else:
        captions = index.captions  # None for shards written before ssl-vit counted them
    captioned = index.num_samples if captions is None else min(captions, index.num_samples)
    said = f"uncaptioned {index.source} {index.num_samples} {captioned}"  # the run reads its data more than once
    if 0 < captioned < index.num_samples and first_time_named(said):
        log.warning(
            "%s: %d of the %s have no caption (photo.txt beside photo.jpg) and are left out; training reads the "
            "%s that do",
            index.source,
            index.num_samples - captioned,
            counted(index.num_samples, "image"),
            counted(captioned, "image"),
        )
    return kept, dataclasses.replace(index, num_samples=captioned or index.num_samples, captions=captions)


def role_batches(batches: int, role: int, num_workers: int) -> int:
    """How many of an epoch's first ``batches`` batches reader ``role`` makes (they are dealt
    round-robin)."""
    return batches // num_workers + (role < batches % num_workers)


def shard_counts(shares: list[int], num_shards: int) -> list[int]:
    """How many of ``num_shards`` shards each reader owns, given its share of the batches: each
    reader with a share gets one, then each next shard goes to the reader with the most batches
    per shard, which keeps the most any reader must read of its own shards per epoch lowest."""
    counts = [1 if share else 0 for share in shares]
    for _ in range(num_shards - sum(counts)):
        neediest = max(range(len(shares)), key=lambda r: shares[r] / counts[r] if counts[r] else 0)
        counts[neediest] += 1
    return counts


def seed_generators(key: str) -> None:
    """Seed this process's torch, Python and NumPy generators from ``key``."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def embedded_to_write(train_shards: str, generate_embedded: bool | str) -> str | None:
    """The embedded dataset a run writes before it reads it: ``generate_embedded``'s, when
    ``train_shards`` is that dataset's missing ``train`` folder (``.../shapes/train``); a user's
    mistyped path is reported missing, never filled with generated images."""
    dataset = "shapes" if generate_embedded is True else generate_embedded
    train = Path(train_shards)
    return dataset if dataset and not train.exists() and train.parts[-2:] == (dataset, "train") else None


def evaluation_split(train_shards: str, val_shards: str | None = None, val_to_come: bool = False) -> tuple[str, str]:
    """The (train, val) data that evaluating on ``train_shards`` reads: ``val_shards`` when given
    (``train_shards#heldout`` leaves the other nine tenths to train on, as no val_shards does),
    else the ``val`` (or ``valid``, ``validation``) folder beside a ``train`` folder (or the one
    about to be written, ``val_to_come``), else the two parts of ``train_shards``'s held-out split."""
    if val_shards:
        base, part = split_part(val_shards)
        if (
            part == HELDOUT_SUFFIX
            and not split_part(train_shards)[1]
            and data_location(base) == data_location(train_shards)
        ):
            return train_shards + TRAIN_SUFFIX, val_shards  # its held-out tenth named: the rest trains, as without it
        return train_shards, val_shards
    beside = [Path(train_shards).parent / name for name in VAL_FOLDERS]
    sibling = next((folder for folder in beside if folder.exists()), beside[0])
    if Path(train_shards).name == "train" and (sibling.exists() or val_to_come):
        return train_shards, str(sibling)
    return train_shards + TRAIN_SUFFIX, train_shards + HELDOUT_SUFFIX


def held_out(train: str, val: str) -> bool:
    """Whether evaluating on ``val`` with ``train`` keeps them apart: other data, or the two
    parts of one held-out split."""
    (val_base, val_part), (train_base, train_part) = split_part(val), split_part(train)
    split_apart = {val_part, train_part} == {HELDOUT_SUFFIX, TRAIN_SUFFIX}
    return split_apart or data_location(val_base) != data_location(train_base)


def seen_images(
    train: str | None,
    val: str,
    trained_on: tuple[str, str | None] | None,
    learns: str = "the neighbours and probes learn from",
) -> str | None:
    """What the scored images ``val`` were seen by, when they were (None when held out): the
    images ``train`` (that ``learns`` from; None when nothing does), or those the run that made
    the encoder trained on (``trained_on``: its data where it found it, and its own val data)."""
    if train is not None and not held_out(train, val):
        return f"the very images that {learns} ({data_location(train)}), so these numbers are not of held-out images"
    if trained_on is None or data_location(split_part(val)[0]) != data_location(split_part(trained_on[0])[0]):
        return None
    run_train, run_val = evaluation_split(*trained_on)
    if not held_out(run_train, run_val):  # the run evaluated on its training data
        return "images the run trained on, so these numbers are not of held-out images"
    if data_location(val) == data_location(run_val):
        return None
    return f"images the run trained on (it held out {run_val}), so these numbers are not of held-out images"


class EpochLoader(DataLoader):
    """A DataLoader that tells its ShardDataset the epoch before the workers start, so shard order
    is keyed on (seed, epoch) and a resumed run reads the same order (Lightning only calls
    ``set_epoch`` on samplers, which iterable datasets do not have), and that resumes mid-epoch.

    Its state (``state_dict``, which Lightning saves in every checkpoint and hands back to
    ``load_state_dict`` when a run resumes mid-epoch) is the epoch and how many of its batches
    were yielded, plus the settings that lay batches out over workers and ranks. All ranks yield
    the same number of batches, so rank 0's state, the one a checkpoint holds, is every rank's.
    """

    def __init__(
        self, dataset: ShardDataset, current_epoch: Callable[[], int], max_skip_fraction: float = 0.1, **kwargs: Any
    ) -> None:
        # Workers seed their generators themselves (ShardDataset); a generator of the loader's own
        # keeps each new iterator from drawing its base seed from the training process's RNG,
        # which a resumed run would otherwise draw at another point than the uninterrupted one.
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, **kwargs)
        self.current_epoch = current_epoch
        self.max_skip_fraction = max_skip_fraction
        self.epoch = 0
        self.batches_yielded = 0  # of this epoch
        self._resume_state: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        self.epoch = self.current_epoch()
        self.batches_yielded = self._first_batch()
        self.dataset.start_epoch(self.epoch, self.batches_yielded)
        for batch in super().__iter__():
            self.batches_yielded += 1
            self.dataset.check_skips(self.max_skip_fraction)
            if self.batches_yielded == len(self):  # Lightning stops at the length without exhausting the loader
                self.dataset.log_epoch_summary()
            yield batch

    def state_dict(self) -> dict[str, int | str]:
        return {"epoch": self.epoch, "batches": self.batches_yielded, **self._layout()}

    def load_state_dict(self, state_dict: dict[str, int | str]) -> None:
        self._resume_state = dict(state_dict)

    def _first_batch(self) -> int:
        """Where this epoch starts: where a loaded state stopped in it, else at its beginning."""
        state, self._resume_state = self._resume_state, None
        # A state saved after an epoch's last batch resumes at the next epoch's first.
        if state is None or state["epoch"] != self.epoch:
            return 0
        now = self._layout()
        changed = [
            "the training data's files" if key == "data" else f"{key} {state[key]} -> {value}"
            for key, value in now.items()
            if key in state and state[key] != value
        ]
        unrecorded = [key for key in now if key not in state]  # a checkpoint of an older ssl-vit
        if changed or unrecorded:
            why = f"{', '.join(changed)} changed since" if changed else "it does not record its data's files"
            log.warning(
                "the checkpoint stopped after batch %d of epoch %d; %s, so its batches may not line up: epoch %d "
                "is read again from its first batch",
                state["batches"],
                self.epoch,
                why,
                self.epoch,
            )
            return 0
        return state["batches"]

    def _layout(self) -> dict[str, int | str]:
        """What lays an epoch's batches out over workers and ranks, the data's files included."""
        layout = {"batch_size": self.batch_size, "num_workers": self.num_workers, "world_size": self.dataset.world_size}
        return {**layout, "data": self.dataset.fingerprint}


class ShardDataModule(L.LightningDataModule):
    """Pretraining data: ``train_shards`` streamed through ``view``.

    Args:
        train_shards: a folder written by ``ssl-vit shards``, a brace pattern of tar files,
            ``pipe:``/remote URLs, or a folder of image files (one sub-folder per class, or none
            for unlabelled images), read directly.
        view: the objective's view transform (PIL image -> tensor or list of tensors).
        val_shards: what evaluation, pictures and health read as held-out data (see
            ``evaluation_data``); by default the ``val`` folder beside a ``train`` one, else the
            held-out tenth of ``train_shards``, which training then never reads.
        batch_size: per device.
        num_workers: loader processes per device, at most the shards per device (fewer shards
            lower it, with a warning).
        shuffle_buffer: samples held for in-stream shuffling, per worker.
        samples_per_epoch: defaults to the shard folder's ``dataset.json`` count.
        seed: keys shard order and shuffling.
        max_skip_fraction: stop the run when more than this fraction of the samples read in an
            epoch are unreadable (corrupt images, broken shards).
        max_image_pixels: skip (and count as unreadable) images whose header declares more
            pixels, without decoding them; the default, ``MAX_IMAGE_PIXELS``, is 64 megapixels.
        generate_embedded: if ``train_shards`` is the missing ``train`` folder of an embedded
            dataset (``data/shapes/train``), write its ``train`` and ``val`` splits there first:
            ``true`` or ``shapes`` for the default, ``glyphs`` for the second one.
    """

    def __init__(
        self,
        train_shards: str,
        view: View,
        val_shards: str | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        shuffle_buffer: int = 2000,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        max_skip_fraction: float = 0.1,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        generate_embedded: bool | str = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["view"])  # plain values only: checkpoints load weights_only
        self.train_shards = os.path.expanduser(train_shards)  # a recipe's ``~/photos``: no shell expands it
        self.view = view
        self.val_shards = val_shards and os.path.expanduser(val_shards)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.max_skip_fraction = max_skip_fraction
        self.max_image_pixels = max_image_pixels
        self.generate_embedded = generate_embedded
        self.train_set: ShardDataset | None = None

    def embedded_to_write(self) -> str | None:
        """The embedded dataset ``prepare_data`` writes (:func:`embedded_to_write`)."""
        return embedded_to_write(self.train_shards, self.generate_embedded)

    def prepare_data(self) -> None:
        dataset = self.embedded_to_write()
        if dataset:
            log.warning("writing the embedded %s dataset to %s", dataset, Path(self.train_shards).parent)
            write_embedded_shards(Path(self.train_shards).parent, dataset=dataset)

    def check_launch(self, world_size: int, captioned: bool = False) -> None:
        """Fail with one message when the batch or the shards cannot feed ``world_size`` ranks
        (``captioned``: with the samples that have a caption); the CLI calls it before any process
        is launched, ``setup`` the same checks on every rank."""
        self._check_settings()
        if not self.embedded_to_write():  # else prepare_data writes them and setup checks them
            first = resolve_shards(self.training_shards())[0][0]  # reachable, before anything is said of its size
            check_reachable(str(first.shard if isinstance(first, SplitPart) else first))
            urls, index, _ = self.training_data(world_size, captioned=captioned)
            if captioned:
                self.check_captions(urls, index)

    def _check_settings(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"data.batch_size is {self.batch_size}; it is the batch per device and must be at least 1")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers is {self.num_workers}; use 0 (load in the training process) or more")

    def training_data(self, world_size: int, captioned: bool = False) -> tuple[list[Shard], ShardIndex | None, int]:
        """The training shards, their index and the whole global batches in an epoch, checked to feed
        ``world_size`` ranks (``data.num_workers`` lowered to the shards each rank has); with
        ``captioned``, of the samples that have a caption."""
        urls, index = resolve_shards(self.training_shards())
        if captioned:
            urls, index = captioned_only(urls, index)
        per_device = len(urls) // world_size
        if per_device == 0:
            raise UserError(
                f"{len(urls)} shards cannot feed {world_size} devices without two readers sharing a shard; write "
                "more, smaller shards (`ssl-vit shards --samples-per-shard`)"
            )
        batches = self.batches_per_epoch(index, world_size)
        if self.num_workers > per_device:
            log.warning(
                "data.num_workers %d -> %d: %d shards feed at most %d readers per device (write more, smaller shards "
                "with `ssl-vit shards --samples-per-shard` to use more workers)",
                self.num_workers,
                per_device,
                len(urls),
                per_device,
            )
            self.num_workers = per_device
        return urls, index, batches

    def evaluation_data(self) -> tuple[str, str]:
        """The shards evaluation reads as (train, val) (:func:`evaluation_split`)."""
        return evaluation_split(self.train_shards, self.val_shards, val_to_come=bool(self.embedded_to_write()))

    def describe(self, captioned: bool = False) -> str | None:
        """What the run reads, in a line a user checks against their folder: the training images
        (with ``captioned``, those with a caption) and classes, and the evaluation images (None for
        data still to be written)."""
        if self.embedded_to_write():
            return None
        train, val = self.evaluation_data()
        urls, index = resolve_shards(self.training_shards())
        if captioned:
            urls, index = captioned_only(urls, index)
        if index is None:  # remote shards without an index: their count is not known before reading
            return None
        # A part of tar shards is split by each sample's key as it is read: its count is the expected share.
        about = "about " if split_part(train)[1] and not all(isinstance(u, ImageFiles) for u in urls) else ""
        classes = ", no class labels"
        if index.classes:  # named: sub-folders that are no classes (dates, batches) show here
            names = list(index.classes)
            if all(isinstance(u, ImageFiles) for u in urls):  # a folder's images per class: a class nearly empty shows
                per_class = collections.Counter(label for u in urls for _, label in u.files)
                names = [f"{name} {per_class[i]:,}" for i, name in enumerate(names)]
            classes = f" in {counted(len(index.classes), 'class', 'classes')} ({first_few(names, 4)})"
        try:
            _, held = resolve_shards(val)
        except UserError:  # no evaluation data: what the evaluation callback says in its own line
            held = None
        evaluated = f"; {about}{held.num_samples:,} of {val} for evaluation" if held is not None else ""
        images = f"{index.num_samples:,} image{'' if index.num_samples == 1 else 's'}"
        return f"{about}{images} of {train}{classes} for training{evaluated}"

    def training_shards(self) -> str:
        """What training reads: ``train_shards``, less the held-out part when evaluation reads it."""
        return self.evaluation_data()[0]

    def batches_per_epoch(self, index: ShardIndex | None, world_size: int) -> int:
        """Whole global batches in an epoch; a run that cannot fill one stops in one line."""
        total = self.samples_per_epoch or (index.num_samples if index else None)
        if total is None:
            raise UserError(f"the number of samples in {self.train_shards!r} is unknown; set data.samples_per_epoch")
        batches = total // (self.batch_size * world_size)
        if batches == 0:
            # A batch of one is never advised: BatchNorm heads and contrastive losses need two or more.
            fix = "add images" + (" or use fewer devices" if world_size > 1 else "")
            if total // world_size >= 2:
                fix = f"set --data.batch_size {total // world_size} or less, or add images"
            raise UserError(
                f"{counted(total, 'sample')} per epoch {'is' if total == 1 else 'are'} fewer than one global batch "
                f"({self.batch_size} x {world_size} devices); {fix}"
            )
        return batches

    def setup(self, stage: str) -> None:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self._check_settings()
        # an image-text objective (CLIP) reads captions, tokenised by its own tokenizer
        captions = getattr(self.trainer.lightning_module, "caption_tokens", None) if self.trainer else None
        urls, index, batches = self.training_data(world, captioned=captions is not None)
        if captions is not None:
            self.check_captions(urls, index, captions)
        self.train_set = ShardDataset(
            urls,
            self.view,
            batch_size=self.batch_size,
            batches_per_epoch=batches,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            world_size=world,
            max_image_pixels=self.max_image_pixels,
            captions=captions,
        )

    def check_captions(
        self, urls: list[Shard], index: ShardIndex | None, captions: CaptionTokenizer | None = None
    ) -> None:
        """Stop in one line when the training data has no captions at all (the index's count, or
        else, with the objective's tokenizer, its first sample), rather than skip every sample."""
        if index is not None and index.captions is not None:
            captioned = index.captions > 0
        elif captions is None:  # before the objective is set up: setup reads the first sample
            return
        else:
            first = ShardDataset(urls[:1], self.view, captions=captions).first_sample()
            captioned = CAPTION_MEMBER in first
        if not captioned:
            raise UserError(
                f"{self.train_shards} has no captions (a .txt beside each image), and this objective trains on image + "
                "caption pairs; write shards with them: `ssl-vit shards imagefolder DIR OUT` (photo.txt beside "
                "photo.jpg) or `ssl-vit shards captions TABLE.tsv OUT` (an embedded dataset written before ssl-vit "
                "gave it captions is written again, with them, once you remove its folder)"
            )

    def train_dataloader(self) -> DataLoader:
        return EpochLoader(
            self.train_set,
            current_epoch=self._current_epoch,
            max_skip_fraction=self.max_skip_fraction,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Views that finish their augmentation on the device (``augment_on_device``) do it here,
        # on the whole batch, once it is on the accelerator.
        on_device = getattr(self.view, "on_device", None)
        if on_device is None:
            return batch
        views, labels = batch
        return on_device(views), labels

    def _current_epoch(self) -> int:
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer else 0
