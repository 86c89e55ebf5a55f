"""The pretrained encoder out of ssl-vit, in timm's own format, and encoder weights back in.

``export_encoder`` writes a folder that ``timm.create_model("local-dir:FOLDER", pretrained=True,
num_classes=N)`` loads as it is (``config.json`` + ``model.safetensors``, pushable to a model hub),
or a plain timm-keyed ``.safetensors`` state dict. ``load_encoder`` returns the timm model from a
checkpoint or an export folder; ``encoder_state_dict`` reads timm-keyed weights from any of them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ssl_vit.checkpoint import (
    checkpoint_encoder,
    encoder_weights,
    load_checkpoint_encoder,
    objective_name,
    read_checkpoint,
)
from ssl_vit.data.views import IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.encoder import NON_TIMM_SETTINGS
from ssl_vit.errors import UserError
from ssl_vit.eval.report import RECORD_KINDS

ExportFormat = Literal["timm", "state_dict"]


def export_encoder(
    checkpoint: str | Path,
    out: str | Path,
    role: str | None = None,
    fmt: ExportFormat = "timm",
    overwrite: bool = False,
) -> Path:
    """Write the encoder of an ssl-vit checkpoint (no decoder, heads, predictor or optimiser).

    role: which encoder, for objectives with two (``teacher``/``student``); by default the one the
        paper evaluates (DINO's EMA teacher, MoCo v3's base encoder).
    fmt: ``timm`` (a folder) or ``state_dict`` (one ``.safetensors`` file).
    The result is written under a temporary name and renamed into place: nothing partial is left.
    """
    ckpt = read_checkpoint(checkpoint)
    encoder, role = checkpoint_encoder(ckpt, checkpoint, role)
    if fmt == "state_dict":
        return write_atomically(
            out,
            overwrite,
            lambda tmp: save_file(
                _contiguous(encoder.vit.state_dict()),
                str(tmp / "model.safetensors"),
                metadata={"architecture": encoder.name},
            ),
            "model.safetensors",
        )
    config = {"pretrained_cfg": preprocessing_cfg(encoder.vit), "ssl_vit": provenance(ckpt, checkpoint, role)}
    return write_timm_folder(encoder.vit, out, _model_args(ckpt["hyper_parameters"]["encoder"]), config, overwrite)


def write_timm_folder(
    model: VisionTransformer, out: str | Path, model_args: dict[str, Any], config: dict[str, Any], overwrite: bool
) -> Path:
    """``model`` as a folder ``timm.create_model("local-dir:OUT", pretrained=True)`` loads:
    ``config.json`` (architecture, ``model_args``, and ``config``'s entries) and
    ``model.safetensors``, written atomically."""

    def write(tmp: Path) -> None:
        save_for_hf(model, str(tmp), model_config=config, model_args=model_args, safe_serialization=True)

    return write_atomically(out, overwrite, write)


def write_atomically(out: str | Path, overwrite: bool, write: Any, member: str | None = None) -> Path:
    """Run ``write(tmp)`` on a temporary folder beside ``out`` and rename it (or its ``member``
    file) into place: nothing partial is ever at ``out``."""
    out = Path(out)
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another path or pass --overwrite")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as err:
        raise UserError(f"cannot write to {out.parent}: {err.strerror}") from err
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp / member if member else tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_encoder(path: str | Path, num_classes: int = 0, role: str | None = None) -> VisionTransformer:
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


def encoder_state_dict(path: str | Path, vit: VisionTransformer) -> dict[str, torch.Tensor]:
    """timm-keyed encoder weights from an export folder, a timm ``local-dir`` folder, a
    ``.safetensors`` / ``.pth`` state dict or an ssl-vit checkpoint, with position embeddings (and
    patch embeddings) resampled to ``vit``'s image and patch grid."""
    path = Path(path)
    if path.is_dir():
        state = load_file(str(path / "model.safetensors"))
    elif path.suffix == ".safetensors":
        state = load_file(str(path))
    elif path.suffix == ".ckpt":
        ckpt = read_checkpoint(path)
        state = {k[len("vit.") :]: v for k, v in encoder_weights(ckpt, path, None)[0].items()}
    elif path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
    else:
        raise UserError(f"encoder weights {path} do not exist")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return checkpoint_filter_fn(state, vit)


def provenance(ckpt: dict[str, Any], checkpoint: str | Path, role: str) -> dict[str, Any]:
    """Where an export came from: objective, recipe settings, step, data, and the run's k-NN /
    probe results if they were written next to the checkpoint."""
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    record: dict[str, Any] = {
        "objective": objective_name(ckpt),
        "encoder_role": role,
        "checkpoint": str(checkpoint),
        "step": ckpt.get("global_step"),
        "recipe": hparams,
        "data": ckpt.get("datamodule_hyper_parameters", {}),
    }
    checkpoint = Path(checkpoint)
    for kind in RECORD_KINDS:
        results = checkpoint.with_name(f"{checkpoint.stem}.{kind}.json")
        if results.is_file():
            record[kind] = json.loads(results.read_text())["results"]
    return record


def _model_args(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in NON_TIMM_SETTINGS}


def preprocessing_cfg(vit: VisionTransformer) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` entries for ssl-vit's evaluation view (what ``timm.data``
    resolves a model's transforms from)."""
    size = vit.patch_embed.img_size
    return {
        "input_size": (3, *size),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bicubic",
        "crop_pct": 224 / 256,
        "classifier": "head",
    }


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in state.items()}
