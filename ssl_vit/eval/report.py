"""Evaluation results as logger metrics, a rich table, and JSON records next to the checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import Tensor

from ssl_vit.data.shards import data_fingerprint, data_location
from ssl_vit.errors import counted
from ssl_vit.eval.evaluator import Results
from ssl_vit.eval.features import FeatureSet
from ssl_vit.replace import file_in_one_step

#: The evaluation records written beside a checkpoint, ``<stem>.<kind>.json``, one per protocol.
RECORD_KINDS = ("knn", "probe", "attentive", "segmentation", "zeroshot", "retrieval")
#: The Evaluator settings each protocol depends on (besides the data and ``COMMON_SETTINGS``): what
#: its record lists, and what its standalone command takes.
COMMON_SETTINGS = ("image_size", "batch_size", "num_workers", "seed")
PROTOCOL_SETTINGS = {
    "knn": ("pooling", "last_blocks", "knn_ks", "knn_temperature", "knn_chunk_size"),
    "probe": (
        "pooling",
        "last_blocks",
        "probe_epochs",
        "probe_batch_size",
        "probe_base_lr",
        "probe_warmup_epochs",
        "probe_optimizer",
        "probe_augment",
    ),
    "attentive": (
        "probe_batch_size",
        "probe_augment",
        "attentive_epochs",
        "attentive_lr",
        "attentive_weight_decay",
        "token_cache_gib",
    ),
    "segmentation": ("probe_batch_size", "seg_epochs", "seg_lr", "seg_weight_decay", "token_cache_gib"),
    "zeroshot": (),  # the model's own image and text embeddings
    "retrieval": (),
}


def metrics(results: Results) -> dict[str, float]:
    """Flat names for a logger: ``eval/knn_k20_top1``, ``eval/probe_top5``..."""
    knn = results.get("knn", {})
    flat = {f"eval/knn_{k.replace('=', '')}_{top}": v for k, acc in knn.items() for top, v in acc.items()}
    flat.update({f"eval/probe_{top}": v for top, v in results.get("probe", {}).items()})
    flat.update({f"eval/attentive_{top}": v for top, v in results.get("attentive", {}).items()})
    flat.update({f"eval/seg_{name}": v for name, v in results.get("segmentation", {}).items() if name != "images"})
    flat.update({f"eval/zeroshot_{top}": v for top, v in results.get("zeroshot", {}).items()})
    for direction in ("image_to_text", "text_to_image"):
        recalls = results.get("retrieval", {}).get(direction, {})
        flat.update({f"eval/retrieval_{direction}_{k}": v for k, v in recalls.items()})
    return flat


def _rows(results: Results) -> dict[str, dict[str, float]]:
    rows = {f"k-NN {k}": acc for k, acc in results.get("knn", {}).items()}
    if "probe" in results:
        rows["linear probe"] = results["probe"]
    if "attentive" in results:
        rows["attentive probe"] = results["attentive"]
    if "zeroshot" in results:
        rows["zero-shot"] = results["zeroshot"]
    return rows


def accuracy_counts(train: FeatureSet, val: FeatureSet) -> dict[str, Any]:
    """What an evaluation's accuracies count, for :func:`print_results` (:func:`label_counts` of
    the evaluation images, from the features already read, not the folders again)."""
    return label_counts(val.labels, classes=int(max(train.labels.max(), val.labels.max())) + 1)


def label_counts(labels: Tensor, classes: int) -> dict[str, Any]:
    """The evaluation images, the ``classes`` their labels run over, how many of those the images
    have, and the share (%) of the largest, which a model answering one class for every image scores."""
    largest = round(100 * labels.long().bincount().max().item() / len(labels), 1)
    return {
        "val_images": len(labels),
        "classes": classes,
        "val_classes": int(labels.unique().numel()),
        "largest_class": largest,
    }


def counts_caption(
    val_images: int | None = None,
    classes: int | None = None,
    val_classes: int | None = None,
    largest_class: float | None = None,
) -> str | None:
    """What the accuracies count ("45 images of 3 classes, 2.2 points each; the largest class alone
    scores 40.0"): on a small held-out part a difference of a point or two may be one image, and
    on unequal classes one answer for every image scores the largest's share."""
    if not val_images:
        return None
    of_classes = f" of {counted(classes, 'class', 'classes')}" if classes else ""
    if classes and val_classes is not None and val_classes < classes:
        of_classes = f" of {val_classes} of the {classes} classes"
    points = f"{100 / val_images:.2g}" if val_images > 1 else "100"
    caption = f"{counted(val_images, 'image')}{of_classes}, {points} points each"
    if largest_class and classes and largest_class > 100 / classes + 0.5:  # unequal classes
        caption += f"; the largest class alone scores {largest_class:.1f}"
    return caption


def print_results(
    title: str,
    results: Results,
    baseline: Results | None = None,
    baseline_name: str = "random init",
    val_images: int | None = None,
    classes: int | None = None,
    val_classes: int | None = None,
    largest_class: float | None = None,
) -> None:
    """One row per image-level protocol: top-1 and top-5 (%), and the baseline's top-1 if known
    (the random initialisation, or the weights a run started from), with how many evaluation
    images and classes they count, if given (no top-5 column for 5 classes or fewer, where it is
    100 whatever the encoder; ``val_classes``: how many of the classes the images have, when not
    all; ``largest_class``: its share, what one answer for every image scores, when the classes
    are unequal); the dense probe's mIoU and pixel accuracy in a second table."""
    console = Console()
    rows = _rows(results)
    if rows:
        caption = counts_caption(val_images, classes, val_classes, largest_class)
        top5 = not classes or classes > 5
        table = Table(title=title, caption=caption, min_width=max(len(title), len(caption or "")))  # each on one line
        columns = [
            "protocol",
            "top-1 %",
            *(["top-5 %"] if top5 else []),
            *([f"{baseline_name} top-1 %"] if baseline else []),
        ]
        for name in columns:
            table.add_column(name, justify="left" if name == "protocol" else "right")
        base_rows = _rows(baseline) if baseline else {}
        for name, acc in rows.items():
            row = [name, f"{acc['top1']:.1f}", *([f"{acc['top5']:.1f}"] if top5 else [])]
            if baseline:
                row.append(f"{base_rows[name]['top1']:.1f}" if name in base_rows else "")
            table.add_row(*row)
        console.print(table)
    if "segmentation" in results:
        base = (baseline or {}).get("segmentation")
        scored = results["segmentation"].get("images")  # records written before it was counted have none
        heading = f"{title}: dense linear probe"  # on one line, over a narrow table
        table = Table(title=heading, caption=counted(scored, "image") if scored else None, min_width=len(heading))
        for name in ("mIoU %", "pixel accuracy %", *([f"{baseline_name} mIoU %"] if base else [])):
            table.add_column(name, justify="right")
        seg = results["segmentation"]
        table.add_row(f"{seg['miou']:.1f}", f"{seg['pixel_acc']:.1f}", *([f"{base['miou']:.1f}"] if base else []))
        console.print(table)
    if "retrieval" in results:
        retrieval, base = results["retrieval"], (baseline or {}).get("retrieval")
        heading = f"{title}: retrieval among {retrieval['pairs']} image-caption pairs"
        table = Table(title=heading, min_width=len(heading))
        recalls = list(retrieval["image_to_text"])
        for name in ("direction", *(f"{k} %" for k in recalls), *([f"{baseline_name} {recalls[0]} %"] if base else [])):
            table.add_column(name, justify="left" if name == "direction" else "right")
        for direction in ("image_to_text", "text_to_image"):
            row = [direction.replace("_to_", " -> "), *(f"{v:.1f}" for v in retrieval[direction].values())]
            table.add_row(*row, *([f"{base[direction][recalls[0]]:.1f}"] if base else []))
        console.print(table)


def write_records(
    checkpoint: str | Path,
    results: Results,
    info: dict[str, Any],
    settings: dict[str, Any],
    seconds: float,
    baseline: Results | None = None,
    stem: Path | None = None,
    tag: str | None = None,
    baseline_name: str = "random init",
    counts: dict[str, Any] | None = None,
) -> list[Path]:
    """``<stem>.<kind>.json`` for each of ``RECORD_KINDS`` in the results: method, encoder, data,
    protocol settings, accuracies and time, each written atomically. ``stem`` defaults to the
    checkpoint's path without its suffix (the run's own records, ``last.knn.json``); a ``tag``
    gives ``<stem>.<kind>.<tag>.json``, the name a standalone evaluation writes under so that it
    never replaces the run's records. ``counts``: what the accuracies count (:func:`label_counts`),
    kept with them for a model card."""
    checkpoint = Path(checkpoint)
    stem = stem or checkpoint.with_suffix("")
    written = []
    for kind in RECORD_KINDS:
        if kind not in results:
            continue
        record = {
            "kind": kind,
            **info,
            "checkpoint": str(checkpoint),
            "data": {
                "train_shards": settings["train_shards"],
                "val_shards": settings["val_shards"],
                "files": settings.get("files"),  # with_files
                # where they were, for a command run from another folder to compare with
                "located": {
                    split: data_location(settings[split]) if settings[split] else None
                    for split in ("train_shards", "val_shards")
                },
            },
            "protocol": {k: settings[k] for k in (*COMMON_SETTINGS, *PROTOCOL_SETTINGS[kind]) if k in settings},
            "results": results[kind],
            "seconds": round(seconds, 2),
        }
        if counts and kind != "segmentation" and kind != "retrieval":  # those count pixels and pairs
            record["counts"] = counts
        if baseline and kind in baseline:
            record[f"{baseline_name.replace(' ', '_')}_results"] = baseline[kind]
        written.append(write_json(stem.with_name(".".join([stem.name, kind, *([tag] if tag else []), "json"])), record))
    return written


def write_json(path: Path, record: dict[str, Any]) -> Path:
    """Temporary file, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_in_one_step(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    return path


def settings_tag(source: str, weights: str | None, settings: dict[str, Any], step: int | None = None) -> str:
    """``eval-<8 hex>``: a hash of what decides the numbers (encoder and its step, weights, data and, from
    ``with_files``, its files, protocol), so the same evaluation run again replaces its own record
    and a different one (or one of images added since) writes beside it."""
    decisive = {k: v for k, v in settings.items() if k not in ("cache_dir", "num_workers")}
    for split in ("train_shards", "val_shards"):  # where they are, however written (shards, ./shards/, its path)
        decisive[split] = data_location(settings[split]) if settings[split] else None
    # the encoder and weights where they are too (run from another folder, the same evaluation), and
    # the step: a run's last.ckpt trained further is other weights under the same name
    encoder, weights = (
        None if p is None else p if p.startswith("timm:") or p == "random" else os.path.realpath(p)
        for p in (str(source), weights)
    )
    text = json.dumps({"encoder": encoder, "weights": weights, "step": step, **decisive}, sort_keys=True, default=str)
    return f"eval-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def with_files(settings: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's settings with the hash of the files its splits read now (``files``), which
    its record keeps and its tag depends on: computed once, as it reads every file's size and time."""
    return {**settings, "files": data_hash(settings["train_shards"], settings["val_shards"])}


def data_hash(train_shards: str | None, val_shards: str | None) -> str:
    """A hash of the files both evaluation splits read now (``data_fingerprint``): images added,
    removed or rewritten since give another."""
    splits = " ".join(data_fingerprint(shards) if shards else "-" for shards in (train_shards, val_shards))
    return hashlib.sha256(splits.encode()).hexdigest()[:16]


def changed_since_run(checkpoint: str | Path, kind: str, settings: dict[str, Any]) -> Path | None:
    """The run's own record of ``kind`` beside ``checkpoint`` (``last.knn.json``) when it scored
    the same data, as located, but other files than the evaluation reads now (for one that reads
    its val split alone, ``train_shards`` None: the run's training files as they are now, and
    these); else None."""
    if Path(checkpoint).suffix != ".ckpt":  # an export folder (".") or timm weights: no run records beside
        return None
    record_path = Path(checkpoint).with_suffix(f".{kind}.json")
    if not record_path.is_file():
        return None
    data = json.loads(record_path.read_text()).get("data", {})
    where = {
        split: (data.get("located") or {}).get(split) or data.get(split) for split in ("train_shards", "val_shards")
    }
    # zero-shot reads its val split alone; the run's record hashed both
    read = {**settings, "train_shards": settings.get("train_shards") or where["train_shards"]}
    same_place = all(
        where[split] and read.get(split) and data_location(where[split]) == data_location(read[split])
        for split in ("train_shards", "val_shards")
    )
    then = data.get("files")  # older records carry none: nothing to compare
    if not (same_place and then):
        return None
    now = settings["files"] if settings.get("train_shards") else data_hash(read["train_shards"], read["val_shards"])
    return record_path if then != now else None
