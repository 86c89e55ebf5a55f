"""The pretrained encoder out of ssl-vit, in timm's own format, and encoder weights back in.

``export_encoder`` writes a folder that ``timm.create_model("local-dir:FOLDER", pretrained=True,
num_classes=N)`` loads as it is (``config.json`` + ``model.safetensors``, pushable to a model hub),
or a plain timm-keyed ``.safetensors`` state dict. ``load_encoder`` returns the timm model from a
checkpoint or an export folder; ``encoder_state_dict`` reads timm-keyed weights from any of them.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models import eva, save_for_hf, vision_transformer
from torch import nn

from ssl_vit.checkpoint import (
    RUN_KEY,
    checkpoint_encoder,
    data_settings,
    encoder_weights,
    failed_verdict,
    load_checkpoint_encoder,
    load_weights_file,
    objective_name,
    read_checkpoint,
)
from ssl_vit.data.pipeline import evaluation_split
from ssl_vit.data.shards import HELDOUT_SUFFIX, split_part
from ssl_vit.data.views import EVAL_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.encoder import NON_TIMM_SETTINGS, TIMM_VITS, TimmViT, ViTEncoder
from ssl_vit.errors import UserError
from ssl_vit.eval.report import RECORD_KINDS, counts_caption
from ssl_vit.onnx_export import ONNX_FILES, Deploy, OnnxOptions, prepare_deploy, require_onnxruntime, write_onnx
from ssl_vit.replace import OutputKind, check_replaceable, replace_output

ExportFormat = Literal["timm", "state_dict"]
#: ``pretrained_cfg`` entries that describe a timm release of an architecture, not an export: its
#: source and licence, and the size its weights were tested at (which timm's validation prefers).
RELEASE_KEYS = ("tag", "license", "hf_hub_id", "url", "file", "source", "origin_url", "paper_ids", "paper_name")
RELEASE_KEYS += ("test_input_size", "test_crop_pct")
# What --overwrite may replace: what save_for_hf writes with safe serialisation, the model card and the
# ONNX models with their report; or one file.
EXPORT_FOLDER = OutputKind(
    "an export folder (config.json, model.safetensors, README.md)",
    ("config.json", "model.safetensors", "README.md", *ONNX_FILES),
    required=("config.json", "model.safetensors"),
    record="config.json",
)
#: The metadata entry that marks a state dict as ssl-vit's (what --overwrite may replace).
WRITTEN_BY = {"written_by": "ssl-vit"}


def unwritten_state_dict(path: Path) -> str | None:
    """Why ``path`` is not a state dict ssl-vit wrote (None when it is)."""
    try:
        with safe_open(str(path), "pt") as weights:
            metadata = weights.metadata() or {}
    except (SafetensorError, OSError):
        return "it is not a safetensors file"
    return None if WRITTEN_BY.items() <= metadata.items() else "its metadata does not say ssl-vit wrote it"


STATE_DICT_FILE = OutputKind("a state_dict export", ("*.safetensors",), folder=False, unwritten=unwritten_state_dict)


def export_encoder(
    checkpoint: str | Path,
    out: str | Path,
    role: str | None = None,
    fmt: ExportFormat = "timm",
    overwrite: bool = False,
    onnx: OnnxOptions | None = None,
) -> Path:
    """Write the encoder of an ssl-vit checkpoint (no decoder, heads, predictor or optimiser).

    role: which encoder, for objectives with two (``teacher``/``student``); by default the one the
        paper evaluates (DINO's EMA teacher, MoCo v3's base encoder).
    fmt: ``timm`` (a folder) or ``state_dict`` (one ``.safetensors`` file).
    The result is written under a temporary name and renamed into place: nothing partial is left.
    ``overwrite`` replaces an earlier export only (``ssl_vit.replace``), never the checkpoint.
    onnx: also write the ONNX models and their report into the folder (``ssl_vit.onnx_export``),
        before it is renamed into place.
    """
    kind = STATE_DICT_FILE if fmt == "state_dict" else EXPORT_FOLDER
    if onnx is not None:
        if fmt != "timm":
            raise UserError("--onnx writes into a timm export folder; leave out --format state_dict")
        require_onnxruntime()  # before the slow checkpoint read too
    check_replaceable(out, kind, overwrite, reads=[checkpoint])  # before the slow checkpoint read
    ckpt = read_checkpoint(checkpoint)
    encoder, role = checkpoint_encoder(ckpt, checkpoint, role)
    return write_encoder(encoder, role, ckpt, checkpoint, out, fmt, overwrite, onnx)


def write_encoder(
    encoder: ViTEncoder,
    role: str,
    ckpt: dict[str, Any],
    checkpoint: str | Path,
    out: str | Path,
    fmt: ExportFormat = "timm",
    overwrite: bool = False,
    onnx: OnnxOptions | None = None,
) -> Path:
    """``export_encoder``'s output for an encoder already built from the read checkpoint ``ckpt``
    (a distillation run's ViT student, which is no pretraining run's encoder)."""
    deploy = prepare_deploy(encoder.vit, onnx, data_settings(ckpt), checkpoint) if onnx else None
    if fmt == "state_dict":
        return replace_output(
            out,
            lambda path: save_file(
                _contiguous(encoder.vit.state_dict()), str(path), metadata={"architecture": encoder.name, **WRITTEN_BY}
            ),
            STATE_DICT_FILE,
            overwrite,
            reads=[checkpoint],
        )
    preprocessing = preprocessing_cfg(encoder.vit.patch_embed.img_size) | {"classifier": "head"}
    config = {"pretrained_cfg": preprocessing, "ssl_vit": provenance(ckpt, checkpoint, role)}
    model_args = _model_args(ckpt["hyper_parameters"]["encoder"])
    return write_timm_folder(encoder.vit, out, model_args, config, overwrite, reads=[checkpoint], deploy=deploy)


def write_timm_folder(
    model: nn.Module,
    out: str | Path,
    model_args: dict[str, Any],
    config: dict[str, Any],
    overwrite: bool,
    reads: Iterable[str | Path] = (),
    deploy: Deploy | None = None,
) -> Path:
    """``model`` as a folder ``timm.create_model("local-dir:OUT", pretrained=True)`` loads:
    ``config.json`` (architecture, ``model_args``, and ``config``'s entries) and
    ``model.safetensors``, written atomically; ``overwrite`` replaces an export folder only, and
    never one that is or holds a path in ``reads``. ``deploy`` (``prepare_deploy``) adds the
    ONNX models (``write_onnx``), in the folder before it is renamed into place."""

    # timm's defaults for the architecture name released weights (their tag, licence, source);
    # they do not describe these.
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in RELEASE_KEYS}

    def write(folder: Path) -> None:
        save_for_hf(model, str(folder), model_config=config, model_args=model_args, safe_serialization=True)
        onnx = [] if deploy is None else ["model.onnx", *(["model.int8.onnx"] if deploy.int8 else [])]
        preprocessing = {**model.pretrained_cfg, **config.get("pretrained_cfg", {})}  # as save_for_hf writes it
        (folder / "README.md").write_text(model_card(model, config.get("ssl_vit", {}), preprocessing, onnx))
        if deploy is not None:
            write_onnx(folder, deploy)

    return replace_output(out, write, EXPORT_FOLDER, overwrite, reads)


def pooled_features(model: nn.Module) -> str:
    """What a timm model's pooled embedding is, in words."""
    if not isinstance(model, TIMM_VITS):
        return "the last feature map, globally pooled"
    return "the mean of the patch tokens" if model.global_pool == "avg" else "the CLS token"


def architecture_name(model: nn.Module) -> str:
    """timm's name of a model; for a ViT, with the shape it has (the name is timm's base, which
    model arguments reshape: ``vit_tiny_patch16_224 with 4 blocks, 128-d, 8-px patches, 32-px images``)."""
    name = model.default_cfg.get("architecture", type(model).__name__)
    if not isinstance(model, TIMM_VITS):
        return name
    patch, size = model.patch_embed.patch_size[0], model.patch_embed.img_size[0]
    return f"{name} with {len(model.blocks)} blocks, {model.embed_dim}-d, {patch}-px patches, {size}-px images"


def model_card(model: nn.Module, record: dict[str, Any], preprocessing: dict[str, Any], onnx: list[str] = ()) -> str:
    """A short README for an export folder: what the weights are, where they came from, how to
    load them (the same facts as ``config.json``'s ``ssl_vit`` record), how an image is prepared
    for them (its ``pretrained_cfg``, ``preprocessing``), and the ``onnx`` models beside them: an
    encoder's, or a fine-tuned classifier's (a model with classes)."""
    architecture = architecture_name(model)
    if getattr(model, "num_classes", 0):
        start = record.get("finetuned_from")
        about = [
            f"- fine-tuned from: `{start}`" if start else "- fine-tuned from random initialisation",
            f"- output: the logits of {model.num_classes} classes (timm's `model(x)`); logit i is "
            "`pretrained_cfg.label_names[i]` in config.json",
        ]
        results = [f"- val {kind}: {value}" for kind, value in record.get("results", {}).items()]
        on = record.get("validated_on") or {}
        results += [f"- {on['note']}"] if results and on.get("note") else []
        images = f"`{on['val_shards']}`" if on.get("val_shards") else "the run's validation images"
        counts = counts_caption(on.get("images"), model.num_classes, largest_class=on.get("majority_class_top1"))
        counts = f"; {counts}" if counts else ""
        evaluated, num_classes = f"Accuracy of this checkpoint on {images} (%{counts}):", ""
    else:
        role = record.get("encoder_role")  # named where the objective has several (DINO's teacher)
        about = [
            f"- objective: {record.get('objective')}" + (f" ({role} encoder)" if role not in ("encoder", None) else ""),
            f"- features: {pooled_features(model)} (timm's `forward_head(x, pre_logits=True)`)",
        ]
        teacher = record.get("recipe", {}).get("teacher")  # a distillation's student
        about += [f"- distilled from the teacher `{teacher}`"] if isinstance(teacher, str) else []
        (evaluated, results), num_classes = run_evaluation(record), ", num_classes=0"
    cfg = preprocessing
    if {"input_size", "crop_pct", "interpolation", "mean", "std"} <= cfg.keys():  # timm's eval transform, in words
        size, side = cfg["input_size"][-1], math.floor(cfg["input_size"][-1] / cfg["crop_pct"])
        about.append(
            f"- input: RGB, the short side resized to {side} px and the long side in proportion, rounded down "
            f"({cfg['interpolation']}, torchvision's `Resize`), centre-cropped to {size} x {size}, normalised by mean "
            f"{tuple(cfg['mean'])} and std {tuple(cfg['std'])} (timm's `resolve_data_config` and `create_transform` "
            "do this from config.json)"
        )
    if onnx:
        models = " and ".join(f"`{name}`" for name in onnx)
        about.append(f"- ONNX: {models} beside the weights, checked and measured in `onnx_report.json`")
    load = ["import timm", f'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True{num_classes})']
    return card(
        f"{architecture}, {record.get('objective', 'ssl-vit')}", record, about, evaluated, results, "timm", load
    )


def card(
    title: str,
    record: dict[str, Any],
    about: list[str],
    evaluated: str,
    results: list[str],
    library: str,
    load: list[str],
) -> str:
    """An export's README: ``title``, where the weights came from (``record``, the export's
    ``ssl_vit`` provenance), ``about`` them, the run's ``results``, and the ``load`` lines of
    Python that load it with ``library`` alone."""
    data = record.get("data", {})
    train = data.get("train_shards", "unknown")
    val = (record.get("evaluated_on") or {}).get("val_shards")
    if val is None and data:
        val = evaluation_split(train, data.get("val_shards"))[1]
    held_out = val is not None and split_part(val)[1] == HELDOUT_SUFFIX  # trained on all of its data but that
    less = ", less its held-out tenth (`#heldout`)" if held_out else ""
    less += ", which it was evaluated on" if held_out and results else ""
    init_from = record.get("recipe", {}).get("init_from")  # a run that continued an earlier one's weights
    started = [f"- started from: `{init_from}` (init_from), whose own training this card does not count"]
    if record.get("recipe", {}).get("pretrained") is False:  # fine-tuning that took its architecture only
        started = [f"- architecture of: `{init_from}` (init_from; its weights not used, `pretrained: false`)"]
    lines = [
        f"# {title}",
        "",
        f"Weights written by ssl-vit {record.get('ssl_vit_version', '')} from `{record.get('checkpoint')}`.",
        "",
        *about,
        *(started if init_from else []),
        f"- optimiser steps: {record.get('step')}{stopped_short(record)}",
        *([f"- **the run failed**: {record['failed']}"] if record.get("failed") else []),
        *(f"- settings changed by a resume {change}" for change in record.get("settings_changed", [])),
        f"- training data: `{record.get('trained_on') or train}`{less}",  # where it was: the card is read elsewhere
        "",
        evaluated,
        "",
        *(results or ["- none recorded with this checkpoint"]),
        "",
        f"Load it with {library} alone:",
        "",
        "```python",
        *load,
        "```",
        "",
        "No licence is stated here: the weights carry the terms of the data they were trained on.",
        "",
    ]
    return "\n".join(lines)


def stopped_short(record: dict[str, Any]) -> str:
    """What a card adds to its step count when the run stopped before the steps it set out to take."""
    step, planned = record.get("step"), record.get("planned_steps")
    if step is None or planned is None or step >= planned:
        return ""
    return f" of the {planned} its run was set to take"


def load_encoder(path: str | Path, num_classes: int = 0, role: str | None = None) -> TimmViT:
    """The timm model of an ssl-vit checkpoint or of an export folder (classifier head fresh when
    ``num_classes`` > 0)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not an export folder (no config.json); pass one written by `ssl-vit export`")
        return timm.create_model(f"local-dir:{path}", pretrained=True, num_classes=num_classes)
    encoder, _ = load_checkpoint_encoder(path, role)
    encoder.vit.reset_classifier(num_classes)
    return encoder.vit


def safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise UserError(
            f"{path} is not a safetensors file ({err}); pass one written by timm or `ssl-vit export`"
        ) from err


def encoder_state_dict(path: str | Path, vit: TimmViT, resample_patches: bool = True) -> dict[str, torch.Tensor]:
    """timm-keyed encoder weights from an export folder, a timm ``local-dir`` folder, a
    ``.safetensors`` / ``.pth`` state dict or an ssl-vit checkpoint, with position embeddings
    resampled to ``vit``'s image grid, and patch embeddings to its patch size (FlexiViT's
    resampling: a start for training; ``resample_patches=False`` refuses weights of another patch
    size instead, for evaluating the weights as they are)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"encoder weights {path} do not exist")
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise UserError(
                f"{path} has no model.safetensors; ssl-vit reads weights folders in safetensors only "
                "(other formats can hold pickled code): pass a folder written by `ssl-vit export`"
            )
        state = safetensors_file(path / "model.safetensors")
    elif path.suffix == ".safetensors":
        state = safetensors_file(path)
    elif path.suffix == ".ckpt":
        ckpt = read_checkpoint(path)
        state = {k[len("vit.") :]: v for k, v in encoder_weights(ckpt, path, None)[0].items()}
    else:
        state = load_weights_file(path, "a weights file", "pass an export folder, a .safetensors or an ssl-vit .ckpt")
        state = state.get("model", state.get("state_dict", state))
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    theirs, ours = state.get("patch_embed.proj.weight"), vit.patch_embed.proj.weight
    if not resample_patches and theirs is not None and theirs.shape[-2:] != ours.shape[-2:]:
        raise UserError(
            f"{path} holds weights of {theirs.shape[-1]}-px patches, this architecture has {ours.shape[-1]}-px: "
            "evaluate them in an architecture of their own (their export folder or checkpoint)"
        )
    # timm's own filters: they also read the official DINOv2 / DINOv3 checkpoints' keys
    return (eva if isinstance(vit, eva.Eva) else vision_transformer).checkpoint_filter_fn(state, vit)


def provenance(ckpt: dict[str, Any], checkpoint: str | Path, role: str) -> dict[str, Any]:
    """Where an export came from: objective, recipe settings, step, data, and the run's k-NN /
    probe results if they were written next to the checkpoint."""
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    record: dict[str, Any] = {
        "ssl_vit_version": importlib.metadata.version("ssl-vit"),
        "objective": objective_name(ckpt),
        "encoder_role": role,
        "checkpoint": str(checkpoint),
        "step": ckpt.get("global_step"),
        "planned_steps": ckpt.get(RUN_KEY, {}).get("planned_steps"),
        "recipe": hparams,
        "data": data_settings(ckpt),  # where the run found its data, whatever folder this is run from
        "trained_on": ckpt.get(RUN_KEY, {}).get("train_shards"),  # where the run found its data
        "failed": failed_verdict(Path(checkpoint), ckpt),  # as the run ended with these weights, if it failed
    }
    # the recipe settings its resumes changed (RunCheckpoint's state), which "recipe" holds only as they ended
    changes = [c.get("settings_changed") for c in ckpt.get("callbacks", {}).values() if isinstance(c, dict)]
    if any(changes):
        record["settings_changed"] = next(filter(None, changes))
    checkpoint, weights_id = Path(checkpoint), ckpt.get(RUN_KEY, {}).get("weights_id")
    for kind in RECORD_KINDS:
        path = checkpoint.with_name(f"{checkpoint.stem}.{kind}.json")
        results = json.loads(path.read_text()) if path.is_file() else None
        # not of an earlier state, nor of other weights at the same step (a run rewound by --ckpt_path)
        of_these = results and results.get("weights_id", weights_id) == weights_id
        if of_these and results.get("step", record["step"]) == record["step"]:
            record[kind] = results["results"]
            record.setdefault("evaluated_on", results.get("data"))
            if results.get("counts"):
                record.setdefault("evaluation_counts", results["counts"])
            if results.get("random_init_results"):
                record.setdefault("random_init", {})[kind] = results["random_init_results"]
    return record


def run_evaluation(record: dict[str, Any]) -> tuple[str, list[str]]:
    """What a model card says of the run's evaluation of the exported checkpoint: a heading
    naming the data and what the accuracies count, and the end-of-run top-1 (mIoU, R@1) per
    protocol, with its random initialisation's."""
    on = record.get("evaluated_on") or {}
    scored = f" on `{on['val_shards']}` (neighbours and probes from `{on['train_shards']}`)" if on else ""
    counts = counts_caption(**record.get("evaluation_counts", {}))
    counts = f" ({counts})" if counts else ""
    return f"Evaluation of this checkpoint by the run{scored}, top-1 %{counts}:", _evaluation_lines(record)


def _evaluation_lines(record: dict[str, Any]) -> list[str]:
    names = {"knn": "k-NN", "probe": "linear probe", "attentive": "attentive probe", "zeroshot": "zero-shot"}
    lines = []
    for kind in RECORD_KINDS:
        if not isinstance(record.get(kind), dict):  # not recorded, or a record file not of ssl-vit's writing
            continue
        base = record.get("random_init", {}).get(kind)
        if kind == "knn":
            values = ", ".join(f"{k} {v['top1']:.1f}" for k, v in record[kind].items())
            baseline = ", ".join(f"{k} {v['top1']:.1f}" for k, v in (base or {}).items())
        elif kind == "segmentation":
            values, baseline = f"mIoU {record[kind]['miou']:.1f}", base and f"mIoU {base['miou']:.1f}"
        elif kind == "retrieval":
            ways = {way: r for way, r in record[kind].items() if isinstance(r, dict)}  # beside it: "pairs"
            values = ", ".join(f"{way.replace('_', ' ')} R@1 {r['R@1']:.1f}" for way, r in ways.items())
            baseline = None
        else:
            values, baseline = f"{record[kind]['top1']:.1f}", base and f"{base['top1']:.1f}"
        lines.append(f"- {names.get(kind, kind)}: {values}" + (f" (random init: {baseline})" if baseline else ""))
    return lines


def _model_args(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NON_TIMM_SETTINGS}


def preprocessing_cfg(size: tuple[int, int]) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` entries for ssl-vit's evaluation view at ``size`` (height, width):
    what ``timm.data`` resolves a model's transforms from."""
    return {
        "input_size": (3, *size),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bicubic",
        "crop_pct": EVAL_CROP_PCT,
    }


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items()}
