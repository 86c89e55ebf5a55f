"""What the evaluators need of an encoder, and where evaluated encoders come from: an ssl-vit
checkpoint (its :class:`~ssl_vit.encoder.ViTEncoder`), an ``ssl-vit export`` or other timm
``local-dir`` folder, or a timm model name, each seen through the same small interface so that
k-NN and the probes run the same code on all of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_vit.checkpoint import load_checkpoint_encoder, read_checkpoint
from ssl_vit.encoder import EncoderOutput, ViTEncoder, ViTProperties
from ssl_vit.errors import UserError
from ssl_vit.export import encoder_state_dict

#: How a timm model name is given on the command line: ``timm:vit_small_patch16_224``.
TIMM_PREFIX = "timm:"


class FrozenEncoder(Protocol):
    """The encoder interface of the evaluators (features, probes, dense probe).

    ``forward`` gives the final-normed tokens, prefix (CLS, register) tokens first; ``vit`` is
    the timm VisionTransformer underneath, read for the native resolution (the default crop),
    the last block's attention heads (the attentive probe's) and the intermediate blocks
    (``last_blocks``). ssl-vit's ``ViTEncoder`` is one; :class:`TimmViTEncoder` adapts any
    timm ViT. Also an ``nn.Module``: ``parameters()`` (its device), ``eval()``, ``train()``.
    """

    vit: VisionTransformer

    @property
    def embed_dim(self) -> int: ...

    @property
    def patch_size(self) -> int: ...

    @property
    def has_class_token(self) -> bool: ...

    def __call__(self, images: Tensor) -> EncoderOutput: ...


class TimmViTEncoder(ViTProperties, nn.Module):
    """A timm VisionTransformer behind the :class:`FrozenEncoder` interface. Its forward is
    timm's ``forward_features`` (patch embedding, position embedding, blocks, final norm): with
    ``dynamic_img_size`` the same computation as ``ViTEncoder``'s forward with timm's position
    embedding resampling, so a checkpoint and its export give the same features."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise UserError(f"the evaluators take timm VisionTransformers; this model is a {type(vit).__name__}")
        self.vit = vit

    def forward(self, images: Tensor) -> EncoderOutput:
        return EncoderOutput(self.vit.forward_features(images), self.vit.num_prefix_tokens, self.has_class_token)


def load_evaluated_encoder(source: str, weights: str | None = None) -> tuple[FrozenEncoder, dict[str, Any]]:
    """The encoder ``source`` names, and a summary of it for the records (method, encoder, step,
    weights).

    source: an ssl-vit ``.ckpt``; a folder with ``config.json`` and ``model.safetensors`` (an
        ``ssl-vit export`` or any timm ``local-dir`` folder); or ``timm:NAME``.
    weights: None for the source's own weights (for ``timm:NAME``, timm's released weights,
        which must be in timm's cache when nothing can be downloaded); ``random`` for the
        source's architecture at random initialisation (seed with ``torch.manual_seed`` first);
        or a weights file or folder (``.safetensors``, ``.pth``, ``.ckpt``, an export folder)
        loaded into that architecture.
    """
    if source.startswith(TIMM_PREFIX):
        name = source[len(TIMM_PREFIX) :]
        if not timm.is_model(name):
            raise UserError(f"{source}: timm has no model {name!r}; `timm.list_models('vit_*')` lists its ViTs")
        info = {"method": "timm", "encoder": {"name": name}, "step": None}
        vit = _timm_vit(name, timm_weights=weights is None, source=source)
        return _with_weights(TimmViTEncoder(vit), weights, source), {**info, "weights": weights or "timm"}
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise UserError(
                f"{path} is not a timm model folder (config.json + model.safetensors); pass an ssl-vit .ckpt, "
                "a folder written by `ssl-vit export`, or timm:NAME"
            )
        config = json.loads((path / "config.json").read_text())
        provenance = config.get("ssl_vit", {})
        info = {
            "method": provenance.get("objective", "timm"),
            "encoder": {"name": config.get("architecture"), **config.get("model_args", {})},
            "step": provenance.get("step"),
        }
        vit = _timm_vit(f"local-dir:{path}", timm_weights=weights is None, source=source)
        return _with_weights(TimmViTEncoder(vit), weights, source), {**info, "weights": weights or str(path)}
    if path.is_file():
        if weights is None:
            encoder, info = load_checkpoint_encoder(path)
            return encoder, {**info, "weights": str(path)}
        ckpt = read_checkpoint(path, mmap=True)
        encoder = ViTEncoder(**ckpt["hyper_parameters"]["encoder"])
        info = {"method": "ViT", "encoder": dict(ckpt["hyper_parameters"]["encoder"]), "step": None}
        return _with_weights(encoder, weights, source), {**info, "weights": weights}
    raise UserError(f"{source} does not exist; pass an ssl-vit .ckpt, an export folder or timm:NAME")


def _timm_vit(name: str, timm_weights: bool, source: str) -> VisionTransformer:
    """timm's model, without a classifier, taking any resolution (as ``ViTEncoder`` does)."""
    try:
        return timm.create_model(name, pretrained=timm_weights, num_classes=0, dynamic_img_size=True)
    except (OSError, RuntimeError, ValueError) as err:  # no cached weights offline, a folder timm cannot read
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(
            f"timm could not build {source} with its weights ({reason}); pass --weights FILE for weights you "
            "have, or --weights random for the architecture at random initialisation"
        ) from err


def _with_weights(encoder: FrozenEncoder, weights: str | None, source: str) -> FrozenEncoder:
    """``encoder`` as built (its own or random weights), or with the weights file loaded."""
    if weights is None or weights == "random":
        return encoder
    try:
        encoder.vit.load_state_dict(encoder_state_dict(weights, encoder.vit))
    except RuntimeError as err:
        raise UserError(
            f"--weights {weights} do not fit {source}'s architecture: {str(err).splitlines()[-1].strip()}"
        ) from err
    return encoder


def standalone_record_stem(source: str, out_dir: str | Path | None = None) -> Path:
    """Where a standalone evaluation of ``source`` writes its records: beside a checkpoint
    (``last`` for ``last.ckpt``) or beside an export folder (``export`` for ``runs/x/export``),
    or in the current folder for ``timm:NAME`` (``NAME``); in ``out_dir`` if given."""
    name = source[len(TIMM_PREFIX) :] if source.startswith(TIMM_PREFIX) else source
    path = Path(name.rstrip("/"))
    stem = path.with_suffix("") if path.suffix == ".ckpt" else path
    return Path(out_dir) / stem.name if out_dir else stem
