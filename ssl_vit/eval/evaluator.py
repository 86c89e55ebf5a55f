"""The evaluation protocols put together: features of a frozen encoder on labelled train/val
shards, then k-NN (DINO), linear probe (MAE), attentive probe (V-JEPA) and dense linear
segmentation probe (DINOv2). Used by the pretraining callback and by ``ssl-vit knn`` /
``probe`` / ``segprobe`` alike, so both give the same numbers."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from ssl_vit.data.pipeline import ShardDataset, eval_loader
from ssl_vit.data.shards import (
    MASK_MEMBER,
    classes_only_in_val,
    names_as_labels,
    relabelled,
    resolve_shards,
    split_part,
    val_labels_as_train,
)
from ssl_vit.data.views import EvalView, MAEView
from ssl_vit.errors import UserError, first_few
from ssl_vit.eval.attentive import train_attentive_probe
from ssl_vit.eval.features import (
    FeatureSet,
    Pooling,
    extract_features,
    feature_cache_files,
    frozen_features,
    load_features,
    save_features,
)
from ssl_vit.eval.knn import knn_classify
from ssl_vit.eval.linear import (
    ProbeOptimizer,
    cached_feature_batches,
    feature_chunks,
    probe_accuracy,
    train_linear_probe,
)
from ssl_vit.eval.segmentation import check_mask_classes, segmentation_scores, train_segmentation_probe

if TYPE_CHECKING:  # ssl_vit.eval.encoders loads weights through ssl_vit.export, which imports this package
    from ssl_vit.eval.encoders import FrozenEncoder

Accuracy = dict[str, float]  # {"top1": %, "top5": %}
# {"knn": {"k=20": Accuracy, ...}, "probe": Accuracy, "attentive": Accuracy,
#  "segmentation": {"miou", "pixel_acc", "images"}}
Results = dict[str, Any]
ProbeHead = Literal["linear", "attentive", "linear+attentive"]
Batches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]  # epoch -> (features, labels) batches


#: Evaluator settings that must be above 0 (a probe of 0 epochs is an untrained head, a k-NN
#: temperature of 0 weighs no neighbour), and those that must not be below 0.
POSITIVE_SETTINGS = (
    "last_blocks",
    "knn_temperature",
    "knn_chunk_size",
    "probe_epochs",
    "probe_batch_size",
    "probe_base_lr",
    "attentive_epochs",
    "attentive_lr",
    "seg_epochs",
    "seg_lr",
    "batch_size",
)
NON_NEGATIVE_SETTINGS = ("probe_warmup_epochs", "attentive_weight_decay", "seg_weight_decay", "num_workers")


def check_settings(settings: dict[str, Any]) -> None:
    """One line for an evaluation setting out of its range, before any work."""
    for name in POSITIVE_SETTINGS + NON_NEGATIVE_SETTINGS:
        value = settings[name]
        if not (value > 0 if name in POSITIVE_SETTINGS else value >= 0):  # NaN fails both
            raise UserError(f"{name} is {value}; it must be {'above' if name in POSITIVE_SETTINGS else 'at least'} 0")
    if not settings["knn_ks"] or any(k < 1 for k in settings["knn_ks"]):
        raise UserError(f"knn_ks is {settings['knn_ks']}; give one or more numbers of neighbours, each 1 or more")
    if settings["image_size"] is not None and settings["image_size"] < 1:
        raise UserError(f"image_size is {settings['image_size']}; leave it out for the encoder's own, or give pixels")
    cache = settings["cache_dir"]
    if cache is not None and os.path.exists(cache) and not os.path.isdir(cache):
        raise UserError(f"cache_dir {cache} is a file; give a folder for the cached features")


def whole_patches(size: int, patch: int | None, own: int) -> int:
    """``size``, an image a ViT with ``patch``-px patches cuts into whole patches (None: not a ViT)."""
    if patch and size % patch:
        raise UserError(
            f"image_size {size} is not a multiple of the encoder's {patch}-px patches; give one, such as "
            f"{max(patch, size // patch * patch)}, or leave it out for the encoder's own ({own})"
        )
    return size


class Evaluator:
    """Frozen-encoder evaluation: k-NN, linear, attentive and dense probes on labelled shards.

    Args:
        train_shards, val_shards: labelled shards (folders written by ``ssl-vit shards``, patterns, URLs).
        image_size: evaluation crop; defaults to the encoder's training resolution.
        pooling: ``cls``, ``mean`` (patch tokens) or ``cls+mean``.
        last_blocks: CLS tokens of the last n blocks, concatenated (DINO's ``n_last_blocks``).
        knn_ks, knn_temperature, knn_chunk_size: DINO's k-NN: all ks in one pass, exp(sim / T) votes.
        head: which probes run: ``linear`` (on ``pooling``), ``attentive`` (on the patch tokens of
            the last block) or both.
        probe_*: MAE's linear probe (and the batch size of both probes); ``probe_augment`` trains
            on RandomResizedCrop + flip views through the frozen encoder (the paper path) instead
            of cached centre-crop features, for both probes.
        attentive_*: V-JEPA's attentive probe.
        segmentation: also run DINOv2's dense linear probe on the shards' label maps
            (``seg.png`` members, as the embedded datasets and ``ssl-vit shards imagefolder
            --masks`` write them), reporting mIoU; ``seg_*`` are its settings.
        token_cache_gib: the attentive and dense probes keep the patch tokens (and label maps) of
            train and val in memory when they fit in this many GiB, and otherwise recompute them
            through the frozen encoder every epoch.
        cache_dir: if set, pooled features are saved there (safetensors) and reused when present.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str,
        image_size: int | None = None,
        pooling: Pooling = "cls",
        last_blocks: int = 1,
        knn_ks: list[int] = [10, 20, 100, 200],  # noqa: B006 (jsonargparse needs the literal default)
        knn_temperature: float = 0.07,
        knn_chunk_size: int = 256,
        probe_epochs: int = 90,
        probe_batch_size: int = 256,
        probe_base_lr: float = 0.1,
        probe_warmup_epochs: float = 10,
        probe_optimizer: ProbeOptimizer = "sgd",
        probe_augment: bool = False,
        head: ProbeHead = "linear",
        attentive_epochs: int = 20,
        attentive_lr: float = 1e-3,
        attentive_weight_decay: float = 1e-3,
        token_cache_gib: float = 4.0,
        segmentation: bool = False,
        seg_epochs: int = 20,
        seg_lr: float = 1e-3,
        seg_weight_decay: float = 1e-4,
        batch_size: int = 256,
        num_workers: int = 2,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        check_settings(locals())
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.image_size = image_size
        self.pooling = pooling
        self.last_blocks = last_blocks
        self.knn_ks = list(knn_ks)
        self.knn_temperature = knn_temperature
        self.knn_chunk_size = knn_chunk_size
        self.probe_epochs = probe_epochs
        self.probe_batch_size = probe_batch_size
        self.probe_base_lr = probe_base_lr
        self.probe_warmup_epochs = probe_warmup_epochs
        self.probe_optimizer = probe_optimizer
        self.probe_augment = probe_augment
        if head not in ("linear", "attentive", "linear+attentive"):
            raise UserError(f"unknown probe head {head!r}; use linear, attentive or linear+attentive")
        self.head = head
        self.attentive_epochs = attentive_epochs
        self.attentive_lr = attentive_lr
        self.attentive_weight_decay = attentive_weight_decay
        self.token_cache_gib = token_cache_gib
        self.segmentation = segmentation
        self.seg_epochs = seg_epochs
        self.seg_lr = seg_lr
        self.seg_weight_decay = seg_weight_decay
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir

    def settings(self) -> dict[str, Any]:
        """The constructor arguments, for results records."""
        return {
            name: getattr(self, name) for name in inspect.signature(Evaluator.__init__).parameters if name != "self"
        }

    def check_shards(self, labels: bool = True, label_maps: bool | None = None) -> None:
        """Fail before any work if a split is missing or known to have no class labels (when
        ``labels``) or no label maps (when ``label_maps``; by default, when the dense probe runs)."""
        if (self.segmentation if label_maps is None else label_maps) and self.without_label_maps():
            # A recipe's dense probe can be turned off; `ssl-vit segprobe` is the probe.
            off = ", or turn the dense probe off (segmentation: false)" if label_maps is None else ""
            raise UserError(
                f"{self.train_shards!r} / {self.val_shards!r} have no label maps (a class-index PNG per image), which "
                "the dense probe needs: write the images with theirs into shards, `ssl-vit shards imagefolder IMAGES "
                f"OUT --masks MAPS` (the map of IMAGES/a/b.jpg is MAPS/a/b.png; docs/evaluation.md){off}"
            )
        unlabelled = self.unlabelled() if labels else None
        if unlabelled:
            raise UserError(
                f"evaluation: {unlabelled}; k-NN and the probes need labelled images: one sub-folder per class, or "
                "shards written from such a folder"
            )
        if labels:
            self.indexed_classes()

    def unlabelled(self) -> str | None:
        """Why the shards cannot be evaluated with labels (``None`` when they can, or are not indexed)."""
        for shards in (self.train_shards, self.val_shards):
            _, index = resolve_shards(shards)
            base = split_part(shards)[0]
            if index is not None and not index.classes:
                name = names_as_labels(base)
                if name:
                    return (
                        f"{base} has no class labels: its cls members are names, not class indices (first: {name}); "
                        "`ssl-vit shards imagefolder` writes integer ones from one sub-folder per class"
                    )
                return (
                    f"{base} has no class labels (they come from one sub-folder per class, or in tar shards an integer "
                    "cls per sample)"
                )
            if index is not None and len(index.classes) == 1:  # e.g. every image in photos/2024/
                return (
                    f"{base} has one class folder ({index.classes[0]}), and class labels need two or "
                    "more (one sub-folder per class)"
                )
        return None

    def without_label_maps(self) -> bool:
        """Whether a split has no label maps (the dense probe's targets): by its index, or, for
        shards without one (a brace pattern, URLs), by its first sample."""
        for shards in (self.train_shards, self.val_shards):
            urls, index = resolve_shards(shards)
            if index is not None:
                if not index.mask_classes:
                    return True
            elif urls and MASK_MEMBER not in ShardDataset(urls[:1], EvalView(32)).first_sample():
                return True
        return False

    def indexed_classes(self) -> list[str]:
        """The class names the splits' indexes give (train's; none when neither is indexed); a val
        split naming classes that train lacks stops here, before any image is read."""
        classes = self._split_classes()
        return classes.get("train") or classes.get("val") or []

    def val_labels(self) -> list[int] | None:
        """Train's label of each val class (by name), when val numbers its classes otherwise."""
        classes = self._split_classes()
        return val_labels_as_train(classes["train"], classes["val"]) if len(classes) == 2 else None

    def _split_classes(self) -> dict[str, list[str]]:
        """Each indexed split's class names, val's checked to be train's."""
        classes = {}
        for split, shards in (("train", self.train_shards), ("val", self.val_shards)):
            _, index = resolve_shards(shards)
            if index and index.classes:
                classes[split] = list(index.classes)
        only_val = classes_only_in_val(classes["train"], classes["val"]) if len(classes) == 2 else []
        if only_val:
            raise UserError(
                f"{self.val_shards} names classes {first_few(only_val, 6)} that {self.train_shards} has not "
                f"({first_few(classes['train'], 6)}): k-NN and the probes score train's classes only, so give "
                "val class folders of the same names (it may lack some of train's)"
            )
        return classes

    def num_classes(self, train: FeatureSet, val: FeatureSet) -> int:
        n = len(self.indexed_classes()) or int(train.labels.max()) + 1
        if int(val.labels.max()) >= n or int(train.labels.max()) >= n:
            raise UserError(f"a label is >= the number of classes ({n}); train and val labels do not match")
        return n

    def _image_size(self, encoder: FrozenEncoder) -> int:
        patch = encoder.patch_size if hasattr(encoder, "vit") else None  # a ViT's image is a grid of whole patches
        return whole_patches(self.image_size or encoder.image_size, patch, encoder.image_size)

    def features(self, encoder: FrozenEncoder, tokens: bool = False) -> tuple[FeatureSet, FeatureSet]:
        """Train and val features (from the cache when it has them). With ``tokens``, the same pass
        keeps the patch tokens the attentive probe trains on, when they fit in ``token_cache_gib``."""
        budget = int(self.token_cache_gib * 2**30) if tokens and self._attentive_reads_cached_tokens() else 0
        splits = {"train": self.train_shards, "val": self.val_shards}
        size = self._image_size(encoder)
        cache = (
            feature_cache_files(self.cache_dir, encoder, splits, size, self.pooling, self.last_blocks)
            if self.cache_dir
            else {}
        )
        result = []
        for split, shards in splits.items():
            cached = cache.get(split)
            if cached and cached.exists():
                result.append(load_features(cached))
                continue
            feats = extract_features(
                encoder,
                shards,
                EvalView(size),
                self.pooling,
                self.last_blocks,
                self.batch_size,
                self.num_workers,
                token_bytes=budget,
            )
            # val's tokens share the budget with train's
            budget = budget - feats.tokens.numel() * feats.tokens.element_size() if feats.tokens is not None else 0
            if cached:
                save_features(cached, feats)
            result.append(feats)
        train, val = result
        return train, val._replace(labels=relabelled(val.labels, self.val_labels()))

    def _attentive_reads_cached_tokens(self) -> bool:
        # With last_blocks > 1 the pooled pass reads the blocks through another path than the
        # attentive probe's tokens; with probe_augment the probe trains on fresh crops.
        return "attentive" in self.head and not self.probe_augment and self.last_blocks == 1

    def knn(self, train: FeatureSet, val: FeatureSet) -> dict[str, Accuracy]:
        """k-NN accuracy for each of ``knn_ks`` up to the number of training images (a larger k
        would be all of them again, under another name); for all of them when every k is larger."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        ks = [k for k in self.knn_ks if k <= len(train.labels)] or [len(train.labels)]
        accuracies = knn_classify(
            train.features.to(device),
            train.labels,
            val.features,
            val.labels,
            self.num_classes(train, val),
            ks,
            self.knn_temperature,
            self.knn_chunk_size,
        )
        return {f"k={k}": acc for k, acc in accuracies.items()}

    def probe(self, encoder: FrozenEncoder, train: FeatureSet, val: FeatureSet) -> Accuracy:
        """The linear probe on the pooled features."""
        num_classes = self.num_classes(train, val)
        batch_size = min(self.probe_batch_size, len(train.labels))
        steps = len(train.labels) // batch_size
        if self.probe_augment:
            epoch_batches = self._streamed_batches(encoder, batch_size, self.pooling, True, steps_per_epoch=steps)
        else:
            epoch_batches = cached_feature_batches(train, batch_size, self.seed)
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the training run's RNG
            torch.manual_seed(self.seed)
            head = train_linear_probe(
                epoch_batches,
                steps_per_epoch=steps,
                dim=train.features.shape[1],
                num_classes=num_classes,
                epochs=self.probe_epochs,
                batch_size=batch_size,
                base_lr=self.probe_base_lr,
                warmup_epochs=self.probe_warmup_epochs,
                optimizer=self.probe_optimizer,
                device=next(encoder.parameters()).device,
            )
        return probe_accuracy(head, feature_chunks(val), num_classes)

    def attentive_probe(self, encoder: FrozenEncoder, train: FeatureSet, val: FeatureSet) -> Accuracy:
        """The attentive probe on the last block's patch tokens; ``train`` and ``val`` (pooled
        features of the same shards) give the sample counts and the classes."""
        num_classes = self.num_classes(train, val)
        batch_size = min(self.probe_batch_size, len(train.labels))
        steps = len(train.labels) // batch_size
        kept = train.tokens is not None and val.tokens is not None
        if not self.probe_augment and (kept or self._tokens_fit(encoder, len(train.labels) + len(val.labels))):
            if kept:  # from the pass that gave the pooled features
                train_tokens, val_tokens = (FeatureSet(split.tokens, split.labels) for split in (train, val))
            else:  # pooled features read from cache_dir, or a pass that kept no tokens
                train_tokens = self._tokens(encoder, self.train_shards)
                val_tokens = self._tokens(encoder, self.val_shards)
            epoch_batches = cached_feature_batches(train_tokens, batch_size, self.seed)
            val_batches: Iterable[tuple[Tensor, Tensor]] = feature_chunks(val_tokens)
        else:
            epoch_batches = self._streamed_batches(
                encoder, batch_size, "patches", augment=self.probe_augment, steps_per_epoch=steps
            )
            val_batches = self._streamed_batches(encoder, batch_size, "patches", split="val")(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = train_attentive_probe(
                epoch_batches,
                steps_per_epoch=steps,
                dim=encoder.embed_dim,
                num_heads=encoder.num_heads,
                num_classes=num_classes,
                epochs=self.attentive_epochs,
                lr=self.attentive_lr,
                weight_decay=self.attentive_weight_decay,
                device=next(encoder.parameters()).device,
            )
        return probe_accuracy(head, val_batches, num_classes)

    def run(self, encoder: FrozenEncoder, probe: bool = True) -> Results:
        """k-NN and, if ``probe``, the probes ``head`` names:
        ``{"knn": {"k=20": {"top1", "top5"}, ...}, "probe": {...}, "attentive": {...}}``."""
        return self.results(encoder, *self.features(encoder, tokens=probe), probe=probe)

    def results(self, encoder: FrozenEncoder, train: FeatureSet, val: FeatureSet, probe: bool = True) -> Results:
        """:meth:`run` on features already extracted."""
        results: Results = {"knn": self.knn(train, val)}
        if probe:
            results.update(self.probes(encoder, train, val))
        return results

    def probes(self, encoder: FrozenEncoder, train: FeatureSet, val: FeatureSet) -> Results:
        """The probes ``head`` names: ``{"probe": linear accuracy, "attentive": attentive accuracy}``."""
        results: Results = {}
        if "linear" in self.head:
            results["probe"] = self.probe(encoder, train, val)
        if "attentive" in self.head:
            results["attentive"] = self.attentive_probe(encoder, train, val)
        if self.segmentation:
            results["segmentation"] = self.segmentation_probe(encoder)
        return results

    def segmentation_probe(self, encoder: FrozenEncoder) -> dict[str, float]:
        """The dense linear probe: ``{"miou": %, "pixel_acc": %, "images": n}`` on the val split's label maps.
        Tokens and maps are cached in memory unless the shards' index says they would not fit."""
        size = self._image_size(encoder)
        grid = (size // encoder.patch_size,) * 2
        indexes = [resolve_shards(shards)[1] for shards in (self.train_shards, self.val_shards)]
        names = next((index.mask_classes for index in indexes if index and index.mask_classes), None)
        total = sum(index.num_samples for index in indexes) if all(indexes) else None
        if total is not None and names and not self._tokens_fit(encoder, total, map_bytes=size * size * 8):
            n_train = indexes[0].num_samples
            num_classes = len(names)
            batch_size = min(self.probe_batch_size, n_train)
            streamed = self._streamed_batches(
                encoder, batch_size, "patches", masks=True, steps_per_epoch=n_train // batch_size
            )

            def epoch_batches(epoch: int) -> Iterable[tuple[Tensor, Tensor]]:
                for tokens, maps in streamed(epoch):
                    check_mask_classes(maps, num_classes)
                    yield tokens, maps

            val_batches: Iterable[tuple[Tensor, Tensor]] = self._streamed_batches(
                encoder, batch_size, "patches", split="val", masks=True
            )(0)
        else:
            train, val = (self._tokens(encoder, shards, masks=True) for shards in (self.train_shards, self.val_shards))
            n_train = len(train.labels)
            num_classes = len(names) if names else int(max(train.labels.max(), val.labels.max())) + 1
            check_mask_classes(train.labels, num_classes)
            batch_size = min(self.probe_batch_size, n_train)
            epoch_batches = cached_feature_batches(train, batch_size, self.seed)
            val_batches = feature_chunks(val, 256)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            head = train_segmentation_probe(
                epoch_batches,
                steps_per_epoch=n_train // batch_size,
                dim=encoder.embed_dim,
                num_classes=num_classes,
                grid=grid,
                out_size=(size, size),
                epochs=self.seg_epochs,
                lr=self.seg_lr,
                weight_decay=self.seg_weight_decay,
                device=next(encoder.parameters()).device,
            )
        return segmentation_scores(head, val_batches, num_classes)

    def _tokens(self, encoder: FrozenEncoder, shards: str, masks: bool = False) -> FeatureSet:
        """Every sample's last-block patch tokens, with its class (or, with ``masks``, its label map)."""
        view = EvalView(self._image_size(encoder))
        return extract_features(encoder, shards, view, "patches", 1, self.batch_size, self.num_workers, masks=masks)

    def _tokens_fit(self, encoder: FrozenEncoder, num_samples: int, map_bytes: int = 0) -> bool:
        """Whether ``num_samples`` samples' float32 patch tokens (and label maps of ``map_bytes``
        each) fit in ``token_cache_gib``."""
        side = self._image_size(encoder) // encoder.patch_size
        per_sample = side * side * encoder.embed_dim * 4 + map_bytes
        return num_samples * per_sample <= self.token_cache_gib * 2**30

    def _streamed_batches(
        self,
        encoder: FrozenEncoder,
        batch_size: int,
        pooling: str,
        augment: bool = False,
        split: str = "train",
        masks: bool = False,
        steps_per_epoch: int = 0,
    ) -> Batches:
        """Features computed through the frozen encoder as the probe trains: every epoch a fresh
        shuffle of the train split in ``steps_per_epoch`` whole batches, through MAE's
        linear-probe training view (RandomResizedCrop 0.08-1, bicubic, + flip) if ``augment``,
        else the evaluation view; ``split="val"`` reads the val split once, in order, through the
        evaluation view. With ``masks`` the labels are the label maps, through the same view."""
        shards = self.train_shards if split == "train" else self.val_shards
        urls, _ = resolve_shards(shards)
        size = self._image_size(encoder)
        view = MAEView(size, scale=(0.08, 1.0)) if augment else EvalView(size)

        def batches(epoch: int):
            if split == "train":
                # Whole batches laid out over the loader's workers, as training reads its data:
                # each worker's last partial batch dropped (drop_last) left a small folder's
                # workers with no batch at all, and the probe untrained.
                dataset = ShardDataset(
                    urls,
                    view,
                    batch_size=batch_size,
                    batches_per_epoch=steps_per_epoch,
                    shuffle_buffer=10 * batch_size,
                    seed=self.seed,
                    masks=masks,
                )
                dataset.epoch = epoch
                workers = min(self.num_workers, len(urls))
                loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
            else:
                loader = eval_loader(urls, view, batch_size, self.num_workers, masks=masks)
            as_train = None if masks or split == "train" else self.val_labels()
            encoder.eval()
            for images, labels in loader:
                yield frozen_features(encoder, images, pooling, self.last_blocks), relabelled(labels.long(), as_train)

        return batches
