"""End-to-end fine-tuning, the MAE paper's recipe (``main_finetune.py``) built from timm's parts:
a timm ViT classifier with global average pooling and fc-norm, initialised from an ``ssl-vit``
export folder, checkpoint or timm weights (or at random), layer-wise lr decay
(``param_groups_layer_decay``), drop path, RandAugment, random erasing, Mixup/CutMix with label
smoothing, AdamW with per-step warm-up and cosine decay; top-1/top-5 on labelled val shards every
epoch. At the end ``ssl-vit finetune`` writes a timm folder *with* the classifier, which
``timm.create_model("local-dir:...", pretrained=True)`` loads and predicts with."""

from __future__ import annotations

import functools
import inspect
import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader, default_collate
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import MulticlassAccuracy

from ssl_vit.checkpoint import data_settings, ending_summary, read_checkpoint, run_checkpoint
from ssl_vit.data.pipeline import ShardDataModule, ShardDataset
from ssl_vit.data.shards import classes_only_in_val, relabelled, resolve_shards, val_labels_as_train
from ssl_vit.data.views import IMAGENET_MEAN, IMAGENET_STD, EvalView
from ssl_vit.encoder import NON_TIMM_SETTINGS, EncoderConfig
from ssl_vit.errors import UserError, last_line
from ssl_vit.eval.encoders import missing_source
from ssl_vit.export import EXPORT_FOLDER, encoder_state_dict, preprocessing_cfg, provenance, write_timm_folder
from ssl_vit.methods.base import adamw
from ssl_vit.onnx_export import Deploy, OnnxOptions, prepare_deploy
from ssl_vit.pictures import shard_class_names
from ssl_vit.replace import check_replaceable
from ssl_vit.schedules import PaperRun, scaled_epochs, steps_per_epoch, warmup_cosine


class FineTuneView:
    """MAE's fine-tuning training view, timm's ``create_transform``: RandomResizedCrop (0.08-1,
    bicubic) + flip, RandAugment ``rand-m9-mstd0.5-inc1``, normalisation, random erasing (0.25,
    per-pixel noise). The RandAugment magnitude is clipped at 9 (``mmax9``) instead of timm's 10:
    at 10 the increasing posterize keeps 0 bits, which Pillow 10 and later reject."""

    def __init__(
        self, size: int = 224, auto_augment: str = "rand-m9-mstd0.5-inc1-mmax9", re_prob: float = 0.25
    ) -> None:
        self.transform = create_transform(
            input_size=size,
            is_training=True,
            color_jitter=None,
            auto_augment=auto_augment,
            interpolation="bicubic",
            re_prob=re_prob,
            re_mode="pixel",
            re_count=1,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        self.size = size

    def __call__(self, image):
        return self.transform(image)


class LabelledShardDataModule(ShardDataModule):
    """The pretraining pipeline over labelled ``train_shards``, plus the validation data read once
    per validation through the evaluation view (each rank its own shards): ``val_shards``, else as
    pretraining evaluates (the val folder beside a train folder, else the held-out tenth, which
    training then leaves out)."""

    #: Train's label of each val class, when val numbers its classes otherwise (``check_labels``).
    val_labels: list[int] | None = None

    def classes(self) -> list[str] | None:
        return shard_class_names(self.train_shards)

    def check_labels(self, num_classes: int) -> str | None:
        """Before any work: both splits labelled, with the same classes, exactly the classes the
        model has (a head with more outputs than the shards have classes trains and scores outputs
        no label names). Val's labels are read as train's of the same class name (each split
        numbers its own classes); a val set without some of train's classes is scored (as by
        ``ssl-vit knn``): what it lacks is returned, for a warning."""
        classes: dict[str, tuple[str, list[str]]] = {}  # split: (its shards, its classes)
        for split, shards in zip(("train_shards", "val_shards"), self.evaluation_data(), strict=True):
            _, index = resolve_shards(shards)
            if index is not None and not index.classes:
                raise UserError(
                    f"data.{split} {shards!r} has no class labels: fine-tuning needs labelled images, one "
                    "sub-folder per class (or shards written from such a folder)"
                )
            if index is not None:
                classes[split] = (shards, list(index.classes))
        lacking = None
        if len(classes) == 2:
            (train, train_names), (val, val_names) = classes["train_shards"], classes["val_shards"]
            only_val = classes_only_in_val(train_names, val_names)
            if only_val:
                raise UserError(
                    f"data.val_shards {val!r} names classes {class_names(only_val)}, which data.train_shards "
                    f"{train!r} has not ({class_names(train_names)}); fine-tuning scores train's classes only, so "
                    "give val class folders of the same names (it may lack some of train's)"
                )
            self.val_labels = val_labels_as_train(train_names, val_names)
            missing = [name for name in train_names if name not in val_names]
            if missing:
                lacking = (
                    f"data.val_shards {val!r} has no {class_names(missing)}: its accuracy is over the other "
                    "classes only"
                )
        # the splits agree from here: num_classes is what to change
        split, (shards, names) = next(iter(classes.items()), (None, (None, None)))
        if names is not None and len(names) == 1:
            raise UserError(
                f"data.{split} {shards!r} has one class ({names[0]}), and a classifier needs two or more: "
                "one sub-folder per class"
            )
        if names is not None and len(names) != num_classes:
            raise UserError(
                f"data.{split} {shards!r} has {len(names)} classes ({class_names(names)}) but "
                f"model.num_classes is {num_classes}; set model.num_classes to {len(names)}"
            )
        return lacking

    def val_dataloader(self) -> DataLoader:
        urls, _ = resolve_shards(self.evaluation_data()[1])
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        size = self.view.size
        dataset = ShardDataset(
            urls,
            EvalView(size),
            shuffle_shards=False,
            rank=rank,
            world_size=world,
            max_image_pixels=self.max_image_pixels,
        )
        workers = min(self.num_workers, max(1, len(urls) // world))
        collate = functools.partial(collate_as_train, train_labels=self.val_labels)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=workers, collate_fn=collate)


def validated_on_record(summary: dict[str, Any]) -> dict[str, Any]:
    """What a fine-tuning run's accuracy counts, from its summary, for its export's card."""
    return {
        "val_shards": summary.get("val_shards"),
        "note": summary.get("val_note"),
        "images": summary.get("val_images"),
        "majority_class_top1": summary.get("val_majority_class_top1"),
    }


def collate_as_train(samples: list[Any], train_labels: list[int] | None) -> list[Tensor]:
    """A val batch with its labels as train's (``val_labels_as_train``)."""
    images, labels = default_collate(samples)
    return [images, relabelled(labels, train_labels)]


def class_names(names: list[str], most: int = 8) -> str:
    """``a, b, c, ...``: the first ``most`` of a list of classes, for a message."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Class labels must be in [0, num_classes): unlabelled samples (-1) or larger indices stop the run."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise UserError("the fine-tuning shards have samples without a class label (no cls member); label them")
    if high >= num_classes:
        raise UserError(f"a class label is {high}, but model.num_classes is {num_classes}; raise model.num_classes")


#: What ``model.init_from`` takes, for the lines that refuse a path.
INIT_FROM_TAKES = "pass an export folder, a run folder or an ssl-vit .ckpt (or timm weights with model.encoder)"


def weights_path(init_from: str) -> str:
    """The file or folder ``init_from`` names: for a run folder (or its ``checkpoints``), its
    newest complete checkpoint, as ``ssl-vit knn`` reads one."""
    path = Path(init_from)
    if not path.exists():
        raise UserError(f"model.init_from {missing_source(init_from, INIT_FROM_TAKES)}")
    if path.is_dir() and not any((path / name).is_file() for name in ("config.json", "model.safetensors")):
        return str(run_checkpoint(path, INIT_FROM_TAKES))
    return init_from


def architecture(init_from: str) -> EncoderConfig:
    """The encoder settings an export folder (``config.json``) or an ssl-vit checkpoint was made with."""
    path = Path(init_from)
    if (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        args = {k: v for k, v in config.get("model_args", {}).items() if k in EncoderConfig.__annotations__}
        return {"name": config["architecture"], **args}
    if path.suffix == ".ckpt" and path.is_file():
        return dict(read_checkpoint(path)["hyper_parameters"]["encoder"])
    raise UserError(
        f"model.init_from {init_from} is neither an export folder nor an ssl-vit checkpoint; "
        "give model.encoder too for timm weights"
    )


#: MAE's fine-tuning of ViT-B/16 (100 epochs at batch 1024), whose 5 warm-up epochs a shorter run
#: shrinks in proportion (``scaled_epochs``, as the objectives' ``scale_to_run``).
MAE_FINETUNE = PaperRun(epochs=100, steps_per_epoch=1281167 // 1024)


class FineTune(L.LightningModule):
    """MAE's fine-tuning, its ViT-B/16 command (FINETUNE.md) as defaults: a timm ViT with
    ``num_classes`` outputs, average-pooled patch tokens and fc-norm (the pretrained final norm
    is dropped, as MAE does), drop path 0.1, AdamW (0.9, 0.999), lr = base_lr 5e-4 x global
    batch / 256 with ``warmup_epochs`` (5 of MAE's 100; a shorter run's in proportion) of per-step
    linear warm-up then cosine to ``min_lr``, layer-wise lr decay 0.65 (MAE's ViT-L: 0.75, base_lr
    1e-3, drop path 0.2), weight decay 0.05 except on biases, norms, position embeddings and
    tokens; Mixup 0.8 / CutMix 1.0 with label smoothing 0.1 (soft-target cross-entropy).

    Args:
        init_from: an export folder, ssl-vit checkpoint or run folder (its newest complete
            checkpoint), timm ``local-dir`` folder or timm ``.safetensors`` / ``.pth`` file; None =
            random initialisation of ``encoder``.
        encoder: the architecture; default: the one ``init_from`` was trained with.
        pretrained: False builds ``init_from``'s architecture at random initialisation (the
            baseline the pretrained run is judged against).
        image_size: the images' side in pixels (``ssl-vit finetune`` takes the data view's);
            None: the architecture's. Weights of another size load with their position
            embeddings resampled to this size's patch grid.
    """

    def __init__(
        self,
        num_classes: int,
        init_from: str | None = None,
        encoder: EncoderConfig | None = None,
        pretrained: bool = True,
        base_lr: float = 5e-4,
        layer_decay: float = 0.65,
        weight_decay: float = 0.05,
        drop_path_rate: float = 0.1,
        warmup_epochs: float = 5,
        min_lr: float = 1e-6,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        label_smoothing: float = 0.1,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if encoder is None and init_from is None:
            raise UserError("set model.init_from (weights to fine-tune) or model.encoder (an architecture)")
        if num_classes < 2:
            raise UserError(f"model.num_classes is {num_classes}; a classifier needs two or more classes")
        check_ranges(
            base_lr=(base_lr, 0, None),
            min_lr=(min_lr, 0, None),
            weight_decay=(weight_decay, 0, None),
            warmup_epochs=(warmup_epochs, 0, None),
            layer_decay=(layer_decay, 0, 1),
            drop_path_rate=(drop_path_rate, 0, 1),
            mixup=(mixup, 0, None),
            cutmix=(cutmix, 0, None),
            label_smoothing=(label_smoothing, 0, 0.99),
        )
        if init_from is not None and (encoder is None or pretrained):  # read only for its architecture or weights
            # the checkpoint a run folder names now, for the record and for a resume to compare
            init_from = self.hparams.init_from = weights_path(init_from)
        config = dict(encoder or architecture(init_from))
        if config["name"] not in timm.list_models(module=["vision_transformer", "eva"]):  # a distilled CNN student
            raise UserError(
                f"ssl-vit finetune fine-tunes ViTs; {init_from or 'model.encoder'} is a {config['name']}: fine-tune "
                'it with timm (timm.create_model("local-dir:EXPORT", pretrained=True, num_classes=N))'
            )
        if image_size is not None:  # timm's ViT takes images of its img_size only
            config["img_size"] = image_size
        self.hparams.encoder = dict(config)  # the architecture, in the checkpoint, whatever gave it
        args = {k: v for k, v in config.items() if k not in NON_TIMM_SETTINGS}
        args.update(num_classes=num_classes, global_pool="avg", fc_norm=True, drop_path_rate=drop_path_rate)
        self.model = timm.create_model(config["name"], pretrained=False, **args)
        self.model_args = args
        if init_from is not None and pretrained:
            self.load_encoder(init_from)
        self.mixup = (
            Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup > 0 or cutmix > 0
            else None
        )
        self.criterion = SoftTargetCrossEntropy() if self.mixup else LabelSmoothingCrossEntropy(label_smoothing)
        # top-5 of five classes or fewer is 100 whatever the model: not measured
        ks = (1, 5) if num_classes > 5 else (1,)
        self.accuracies = nn.ModuleDict({f"top{k}": MulticlassAccuracy(num_classes, k, average="micro") for k in ks})
        self.validated_labels = CatMetric()  # what the accuracies count, from every device
        self.validated_at: int | None = None  # the step of the last validation

    def load_encoder(self, path: str) -> None:
        """The pretrained encoder into the classifier: everything but the new head and fc-norm
        must fit, and only the final norm (replaced by fc-norm) may be left over, as MAE checks."""
        try:
            missing, unexpected = self.model.load_state_dict(encoder_state_dict(path, self.model), strict=False)
        except RuntimeError as err:
            raise UserError(f"model.init_from {path} does not fit the classifier: {last_line(err)}") from err
        if "head.weight" in missing:  # main_finetune.py: the new classifier starts near zero, at std 2e-5
            nn.init.trunc_normal_(self.model.head.weight, std=2e-5)
        missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
        unexpected = [k for k in unexpected if not k.startswith("norm.")]
        if missing or unexpected:
            raise UserError(
                f"model.init_from {path} does not fit the classifier (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); check model.encoder"
            )

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        if self.global_step == 0 and batch_idx == 0:  # shards without an index are checked on their first batch
            check_labels(labels, self.hparams.num_classes)
        targets = labels
        if self.mixup is not None:
            if len(labels) % 2:
                raise UserError(f"Mixup/CutMix need an even batch; data.batch_size is {len(labels)}")
            images, targets = self.mixup(images, labels)
        loss = self.criterion(self.model(images), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        logits = self.model(images)
        for accuracy in self.accuracies.values():
            accuracy.update(logits, labels)
        self.validated_labels.update(labels)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:  # the weights these accuracies are of
            self.validated_at = self.global_step
        accuracies = {f"val/{name}": 100 * m.compute() for name, m in self.accuracies.items()}  # every rank's
        self.log_dict(accuracies, prog_bar=True, sync_dist=True)
        labels = self.validated_labels.compute().long()  # every rank's: the same on each, so a mean keeps it
        self.log("val/images", float(len(labels)), sync_dist=True)
        # what answering the largest class for every image scores: the accuracy to beat
        self.log("val/majority_class_top1", 100 * labels.bincount().max().float() / len(labels), sync_dist=True)
        for metric in (*self.accuracies.values(), self.validated_labels):
            metric.reset()

    def peak_lr(self, per_device_batch: int) -> float:
        world = self.trainer.world_size * self.trainer.accumulate_grad_batches
        return self.hparams.base_lr * per_device_batch * world / 256

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        per_epoch = steps_per_epoch(self.trainer)
        total = int(self.trainer.estimated_stepping_batches)
        warmup_epochs = scaled_epochs(self.hparams.warmup_epochs, total / per_epoch, MAE_FINETUNE)
        warmup = round(warmup_epochs * per_epoch)
        peak = self.peak_lr(len(batch[1]))
        lr = warmup_cosine(self.global_step, total, warmup, peak, self.hparams.min_lr)
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.log("train/lr", lr)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # A run that reaches max_steps mid-epoch (a budget in steps, as the quickstart's) would end
        # without validating; stopping on that batch makes Lightning validate there, as at an epoch's end.
        if 0 < self.trainer.max_steps <= self.global_step:
            self.trainer.should_stop = True

    def resume_problem(self, checkpoint: dict[str, Any]) -> str | None:
        """Why this run cannot continue ``checkpoint`` (None: it can): the weights it started from
        (pretrained or not) and its classifier's classes are what its card and accuracy are of."""
        then = checkpoint.get("hyper_parameters", {})
        for key in ("pretrained", "num_classes", "label_names"):
            if key in then and then[key] != self.hparams.get(key):
                return f"its model.{key} is {then[key]}, this run's {self.hparams.get(key)}"
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = param_groups_layer_decay(
            self.model,
            weight_decay=self.hparams.weight_decay,
            no_weight_decay_list=self.model.no_weight_decay(),
            layer_decay=self.hparams.layer_decay,
        )
        return adamw(self, groups, betas=(0.9, 0.999))


def check_ranges(**settings: tuple[float, float, float | None]) -> None:
    """One line for the first setting (name=(value, least, most)) out of its range, before any work:
    a negative lr trains by gradient ascent, a label smoothing of 1 or more towards wrong labels."""
    for name, (value, least, most) in settings.items():
        if not least <= value <= (math.inf if most is None else most):  # NaN fails too
            bound = f"from {least} to {most}" if most is not None else f"{least} or more"
            raise UserError(f"model.{name} is {value}; it must be {bound}")


def export_classifier(
    module: FineTune,
    out: str | Path,
    classes: list[str] | None,
    results: dict[str, Any],
    checkpoint: str | Path | None = None,
    overwrite: bool = True,
    deploy: Deploy | None = None,
    validated_on: dict[str, Any] | None = None,
) -> Path:
    """The fine-tuned classifier, head included, as a timm folder (``label_names`` from the
    shards' classes), with where it came from (its ``checkpoint``'s run) and its val accuracy in
    ``config.json`` and the model card, with the images it counts (``validated_on``: ``val_shards``
    and a ``note`` on classes they lack); ``deploy`` adds its ONNX models (logits)."""
    cfg = {**preprocessing_cfg(module.model.patch_embed.img_size), "classifier": "head"}
    cfg["num_classes"] = module.hparams.num_classes
    if classes:
        cfg["label_names"] = classes
    record = provenance(read_checkpoint(checkpoint, mmap=True), checkpoint, "classifier") if checkpoint else {}
    record |= {
        "objective": "fine-tuning",
        "finetuned_from": module.hparams.init_from if module.hparams.pretrained else None,
        "recipe": {k: v for k, v in module.hparams.items() if k != "encoder"},
        "results": results,
        "validated_on": validated_on or {},
    }
    args = {k: v for k, v in module.model_args.items() if k not in ("num_classes", "drop_path_rate")}
    config = {"pretrained_cfg": cfg, "ssl_vit": record}
    reads = [checkpoint] if checkpoint else []
    return write_timm_folder(module.model, out, args, config, overwrite, reads, deploy)


def export_finetuned(
    checkpoint: str | Path, out: str | Path, overwrite: bool = False, onnx: OnnxOptions | None = None
) -> Path:
    """A fine-tuning checkpoint's classifier as its run exports it (``ssl-vit export`` of a
    fine-tuning run: another checkpoint of it, or with ``onnx`` its ONNX models too); the class
    names the run trained with, the accuracy from the run's
    ``summary.json`` where it ends with this checkpoint."""
    check_replaceable(out, EXPORT_FOLDER, overwrite, reads=[checkpoint])  # before the slow checkpoint read
    ckpt = read_checkpoint(checkpoint)
    settings = {k: v for k, v in ckpt["hyper_parameters"].items() if k in inspect.signature(FineTune).parameters}
    module = FineTune(**{**settings, "pretrained": False})  # its architecture, then its weights
    module.hparams["pretrained"] = settings.get("pretrained", True)  # as it was fine-tuned, for its record
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    module.model.load_state_dict(weights)
    data = data_settings(ckpt)
    deploy = prepare_deploy(module.model, onnx, data) if onnx else None
    classes = ckpt["hyper_parameters"].get("label_names")  # as the run trained; its data may have changed since
    if classes is None:  # a checkpoint that predates the record: the data's names, where it can be read here
        try:
            classes = shard_class_names(data["train_shards"])
        except (KeyError, UserError):
            classes = None
    summary = ending_summary(Path(checkpoint), ckpt) or {}
    results = {k: summary[f"val_{k}"] for k in ("top1", "top5") if summary.get(f"val_{k}") is not None}
    validated_on = validated_on_record(summary) if results else None
    return export_classifier(module, out, classes, results, checkpoint, overwrite, deploy, validated_on)
