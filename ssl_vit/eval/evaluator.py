"""The evaluation protocols put together: features of a frozen encoder on labelled train/val
shards, then k-NN (DINO) and linear probe (MAE). Used by the pretraining callback and by
``ssl-vit knn`` / ``ssl-vit probe`` alike, so both give the same numbers."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from ssl_vit.data.pipeline import ShardDataset
from ssl_vit.data.shards import resolve_shards
from ssl_vit.data.views import EvalView, MAEView
from ssl_vit.encoder import ViTEncoder
from ssl_vit.errors import UserError
from ssl_vit.eval.features import (
    FeatureSet,
    Pooling,
    extract_features,
    frozen_features,
    load_features,
    save_features,
)
from ssl_vit.eval.knn import knn_classify
from ssl_vit.eval.linear import ProbeOptimizer, cached_feature_batches, probe_accuracy, train_linear_probe

Accuracy = dict[str, float]  # {"top1": %, "top5": %}
Results = dict[str, Any]  # {"knn": {"k=20": Accuracy, ...}, "probe": Accuracy}


class Evaluator:
    """k-NN and linear-probe evaluation on labelled ``train_shards`` / ``val_shards``.

    Args:
        train_shards, val_shards: labelled shards (folders written by ``ssl-vit shards``, patterns, URLs).
        image_size: evaluation crop; defaults to the encoder's training resolution.
        pooling: ``cls``, ``mean`` (patch tokens) or ``cls+mean``.
        last_blocks: CLS tokens of the last n blocks, concatenated (DINO's ``n_last_blocks``).
        knn_ks, knn_temperature, knn_chunk_size: DINO's k-NN: all ks in one pass, exp(sim / T) votes.
        probe_*: MAE's linear probe; ``probe_augment`` trains on RandomResizedCrop + flip views
            through the frozen encoder (the paper path) instead of cached centre-crop features.
        cache_dir: if set, features are saved there (safetensors) and reused when present.
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
        batch_size: int = 256,
        num_workers: int = 2,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
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
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir

    def settings(self) -> dict[str, Any]:
        """The constructor arguments, for results records."""
        return {
            name: getattr(self, name) for name in inspect.signature(Evaluator.__init__).parameters if name != "self"
        }

    def check_shards(self) -> None:
        """Fail before any work if a split is missing or known to be unlabelled."""
        for split, shards in (("train_shards", self.train_shards), ("val_shards", self.val_shards)):
            _, index = resolve_shards(shards)
            if index is not None and not index.classes:
                raise UserError(
                    f"evaluation {split} {shards!r} has no class labels (written from a folder without class "
                    "sub-folders); k-NN and linear probes need labelled shards: write them with "
                    "`ssl-vit shards imagefolder` from one sub-folder per class"
                )

    def num_classes(self, train: FeatureSet, val: FeatureSet) -> int:
        classes = {}
        for split, shards in (("train", self.train_shards), ("val", self.val_shards)):
            _, index = resolve_shards(shards)
            if index and index.classes:
                classes[split] = index.classes
        if len(classes) == 2 and classes["train"] != classes["val"]:
            raise UserError(
                f"train and val shards name different classes ({len(classes['train'])} vs {len(classes['val'])}); "
                "write both splits from the same class folders"
            )
        n = len(classes.get("train") or classes.get("val") or []) or int(train.labels.max()) + 1
        if int(val.labels.max()) >= n or int(train.labels.max()) >= n:
            raise UserError(f"a label is >= the number of classes ({n}); train and val labels do not match")
        return n

    def _image_size(self, encoder: ViTEncoder) -> int:
        return self.image_size or encoder.vit.patch_embed.img_size[0]

    def features(self, encoder: ViTEncoder) -> tuple[FeatureSet, FeatureSet]:
        """Train and val features (from the cache when it has them)."""
        result = []
        for split, shards in (("train", self.train_shards), ("val", self.val_shards)):
            cached = (
                Path(self.cache_dir) / f"{split}-{self.pooling}-last{self.last_blocks}.safetensors"
                if self.cache_dir
                else None
            )
            if cached and cached.exists():
                result.append(load_features(cached))
                continue
            feats = extract_features(
                encoder,
                shards,
                EvalView(self._image_size(encoder)),
                self.pooling,
                self.last_blocks,
                self.batch_size,
                self.num_workers,
            )
            if cached:
                cached.parent.mkdir(parents=True, exist_ok=True)
                save_features(cached, feats)
            result.append(feats)
        return result[0], result[1]

    def knn(self, train: FeatureSet, val: FeatureSet) -> dict[str, Accuracy]:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        accuracies = knn_classify(
            train.features.to(device),
            train.labels,
            val.features,
            val.labels,
            self.num_classes(train, val),
            self.knn_ks,
            self.knn_temperature,
            self.knn_chunk_size,
        )
        return {f"k={k}": acc for k, acc in accuracies.items()}

    def probe(self, encoder: ViTEncoder, train: FeatureSet, val: FeatureSet) -> Accuracy:
        num_classes = self.num_classes(train, val)
        batch_size = min(self.probe_batch_size, len(train.labels))
        if self.probe_augment:
            epoch_batches = self._augmented_batches(encoder, batch_size)
        else:
            epoch_batches = cached_feature_batches(train, batch_size, self.seed)
        with torch.random.fork_rng(devices=[]):  # seeded, without touching the training run's RNG
            torch.manual_seed(self.seed)
            head = train_linear_probe(
                epoch_batches,
                steps_per_epoch=len(train.labels) // batch_size,
                dim=train.features.shape[1],
                num_classes=num_classes,
                epochs=self.probe_epochs,
                batch_size=batch_size,
                base_lr=self.probe_base_lr,
                warmup_epochs=self.probe_warmup_epochs,
                optimizer=self.probe_optimizer,
                device=next(encoder.parameters()).device,
            )
        return probe_accuracy(head, val, num_classes)

    def run(self, encoder: ViTEncoder, probe: bool = True) -> Results:
        """k-NN and, if ``probe``, the linear probe: ``{"knn": {"k=20": {"top1", "top5"}, ...}, "probe": {...}}``."""
        return self.results(encoder, *self.features(encoder), probe=probe)

    def results(self, encoder: ViTEncoder, train: FeatureSet, val: FeatureSet, probe: bool = True) -> Results:
        """:meth:`run` on features already extracted."""
        results: Results = {"knn": self.knn(train, val)}
        if probe:
            results["probe"] = self.probe(encoder, train, val)
        return results

    def _augmented_batches(self, encoder: ViTEncoder, batch_size: int):
        """The paper path: every epoch, fresh RandomResizedCrop + flip views through the frozen encoder."""
        urls, _ = resolve_shards(self.train_shards)
        # MAE's linear-probe training view: RandomResizedCrop (default scale 0.08-1, bicubic) + flip.
        view = MAEView(self._image_size(encoder), scale=(0.08, 1.0))

        def batches(epoch: int):
            dataset = ShardDataset(urls, view, shuffle_buffer=10 * batch_size, seed=self.seed)
            dataset.epoch = epoch
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, num_workers=min(self.num_workers, len(urls)), drop_last=True
            )
            encoder.eval()
            for images, labels in loader:
                yield frozen_features(encoder, images, self.pooling, self.last_blocks), labels

        return batches
