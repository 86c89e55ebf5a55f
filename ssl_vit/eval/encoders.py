"""What the evaluators need of an encoder, and where evaluated encoders come from: an ssl-vit
checkpoint (its :class:`~ssl_vit.encoder.ViTEncoder`), an ``ssl-vit export`` or other timm
``local-dir`` folder, or a timm model name, each seen through the same small interface so that
k-NN and the probes run the same code on all of them."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import timm
import torch
from torch import Tensor, nn

from ssl_vit.checkpoint import RUN_KEY, data_settings, load_checkpoint_encoder, read_checkpoint, run_checkpoint
from ssl_vit.encoder import TIMM_VITS, EncoderOutput, TimmViT, ViTEncoder, ViTProperties
from ssl_vit.errors import UserError, last_line
from ssl_vit.export import encoder_state_dict

#: How a timm model name is given on the command line: ``timm:vit_small_patch16_224``.
TIMM_PREFIX = "timm:"


class FrozenEncoder(Protocol):
    """The encoder interface of the evaluators (features, probes, dense probe).

    ``forward`` gives an output whose ``cls`` is the image embedding and ``patches`` the
    final-normed spatial tokens, (B, h*w, D); ``image_size`` is the native resolution (the
    default crop), ``num_heads`` the attentive probe's heads. ssl-vit's ``ViTEncoder`` is one;
    :class:`TimmViTEncoder` adapts any timm ViT (whose ``vit`` also gives the intermediate blocks
    for ``last_blocks``), :class:`TimmModelEncoder` any other timm model (a CNN). Also an
    ``nn.Module``: ``parameters()`` (its device), ``eval()``, ``train()``.
    """

    @property
    def embed_dim(self) -> int: ...

    @property
    def patch_size(self) -> int: ...

    @property
    def has_class_token(self) -> bool: ...

    @property
    def image_size(self) -> int: ...

    @property
    def num_heads(self) -> int: ...

    def __call__(self, images: Tensor) -> EncoderOutput | PooledOutput: ...

    def pooled_and_map(self, images: Tensor) -> tuple[Tensor, Tensor]: ...


class TimmViTEncoder(ViTProperties, nn.Module):
    """A timm ViT (``VisionTransformer`` or RoPE ``Eva``) behind the :class:`FrozenEncoder` interface. Its forward is
    timm's ``forward_features`` (patch embedding, position embedding, blocks, final norm): with
    ``dynamic_img_size`` the same computation as ``ViTEncoder``'s forward with timm's position
    embedding resampling, so a checkpoint and its export give the same features."""

    def __init__(self, vit: TimmViT) -> None:
        super().__init__()
        if not isinstance(vit, TIMM_VITS):
            raise UserError(f"the evaluators take timm ViTs; this model is a {type(vit).__name__}")
        self.vit = vit

    def forward(self, images: Tensor) -> EncoderOutput:
        return EncoderOutput(self.vit.forward_features(images), self.vit.num_prefix_tokens, self.has_class_token)


class PooledOutput(NamedTuple):
    """:class:`~ssl_vit.encoder.EncoderOutput` of a model without tokens: ``cls`` is its pooled
    embedding, ``patches`` its spatial map as tokens, (B, h*w, C)."""

    cls: Tensor
    patches: Tensor
    has_class_token: bool = True


class TimmModelEncoder(nn.Module):
    """Any timm model (a CNN: ResNet, MobileNet, ConvNeXt...) behind the :class:`FrozenEncoder`
    interface, through timm's own interfaces: the embedding is ``forward_head(forward_features(x),
    pre_logits=True)`` (what the model feeds its classifier, so ``pooling: cls`` reads it) and the
    tokens are the ``forward_features`` map flattened, (B, h*w, C), which the attentive and dense
    probes read as a ViT's patch tokens. ``patch_size`` is the map's stride at ``image_size``
    (found by a forward pass of one blank image, in eval mode so that BatchNorm statistics stay
    as they are)."""

    def __init__(self, model: nn.Module, image_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        size = image_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        self.image_size = int(size)
        self._shapes: dict[int, tuple[int, int, int]] = {}  # image size -> (pooled dim, map channels, map side)

    def pooled_and_map(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The pooled embedding, (B, D), and the spatial map, (B, C, h, w)."""
        features = self.model.forward_features(images)
        pooled = self.model.forward_head(features, pre_logits=True)
        return pooled, spatial_map(self.model, features, images.shape[-2])

    def forward(self, images: Tensor) -> PooledOutput:
        pooled, fmap = self.pooled_and_map(images)
        return PooledOutput(pooled, fmap.flatten(2).transpose(1, 2))

    def shapes(self, size: int) -> tuple[int, int, int]:
        """(pooled dim, map channels, map side) for ``size``-px images."""
        if size not in self._shapes:
            was_training = self.training
            self.eval()
            try:
                with torch.no_grad():
                    device = next(self.parameters()).device
                    pooled, fmap = self.pooled_and_map(torch.zeros(1, 3, size, size, device=device))
            finally:
                self.train(was_training)
            self._shapes[size] = (pooled.shape[1], fmap.shape[1], fmap.shape[2])
        return self._shapes[size]

    @property
    def embed_dim(self) -> int:
        return self.shapes(self.image_size)[1]

    @property
    def patch_size(self) -> int:
        return self.image_size // self.shapes(self.image_size)[2]

    @property
    def has_class_token(self) -> bool:
        return True  # the pooled embedding stands for it

    @property
    def num_heads(self) -> int:
        """Heads of 64 channels, as in ViTs, or the most of them that divide the channels."""
        dim = self.embed_dim
        return next(h for h in range(max(1, dim // 64), 0, -1) if dim % h == 0)


def spatial_map(model: nn.Module, features: Tensor, height: int) -> Tensor:
    """A timm model's ``forward_features`` output as a (B, C, h, w) map: a CNN's NCHW map as it is
    (NHWC for models that say so, e.g. Swin), a ViT's tokens without the prefix (CLS, register)
    tokens, on the grid of a ``height``-px input."""
    if features.ndim == 4:
        return features.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else features
    tokens = features[:, getattr(model, "num_prefix_tokens", 0) :]
    h = height // model.patch_embed.patch_size[0]
    return tokens.transpose(1, 2).reshape(len(tokens), tokens.shape[-1], h, -1)


def timm_encoder(model: nn.Module, image_size: int | None = None) -> FrozenEncoder:
    """A timm model behind the evaluators' interface: :class:`TimmViTEncoder` for a ViT,
    :class:`TimmModelEncoder` for anything else."""
    return TimmViTEncoder(model) if isinstance(model, TIMM_VITS) else TimmModelEncoder(model, image_size)


def resolve_run_folder(source: str) -> str:
    """``source`` as given, or for a run folder (``runs/photos/simclr``) its newest complete
    checkpoint, as ``ssl-vit export`` reads one."""
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        return str(run_checkpoint(path))
    return source


def missing_source(
    source: str, remedy: str = "pass an ssl-vit .ckpt, a run folder, an export folder or timm:NAME"
) -> UserError:
    """``source`` does not exist: one line, with the nearest name beside it (a typo's fix), then
    ``remedy`` (what the command takes)."""
    path = Path(source)
    siblings = [entry.name for entry in path.parent.iterdir()] if path.parent.is_dir() else []
    near = difflib.get_close_matches(path.name, siblings, n=1)
    hint = f" (did you mean {path.parent / near[0]}?)" if near else ""
    return UserError(f"{source} does not exist{hint}; {remedy}")


def run_data(source: str) -> tuple[str, str | None] | None:
    """What the run that wrote ``source`` trained on, as (``data.train_shards`` where it was when
    the run read it, ``data.val_shards``), for a checkpoint, a run folder, a run's own export
    (beside its ``checkpoints/``) or an export ``ssl-vit export`` wrote elsewhere (its provenance);
    None for anything else (another timm folder, ``timm:NAME``)."""
    path = Path(source)
    if not source.startswith("timm:") and not path.exists():
        raise missing_source(source)
    if path.is_dir() and (path.parent / "checkpoints").is_dir():  # <run>/export
        path = path.parent
    elif path.is_dir() and (path / "config.json").is_file():
        record = export_record(path)
        trained_on = record.get("trained_on")
        return (trained_on, (record.get("data") or {}).get("val_shards")) if trained_on else None
    path = Path(resolve_run_folder(str(path)))
    if path.suffix != ".ckpt" or not path.is_file():
        return None
    ckpt = read_checkpoint(path, mmap=True)
    data = data_settings(ckpt)
    return (data["train_shards"], data.get("val_shards")) if ckpt.get(RUN_KEY, {}).get("train_shards") else None


def export_record(folder: str | Path) -> dict[str, Any]:
    """What an ``ssl-vit export`` folder records of its run (``config.json``'s ``ssl_vit``: the
    checkpoint it was written from, the data, the results); {} for any other folder."""
    try:
        record = json.loads((Path(folder) / "config.json").read_text()).get("ssl_vit", {})
    except (OSError, ValueError, AttributeError):  # none, not JSON, or not an object
        return {}
    return record if isinstance(record, dict) else {}


def own_pooling(encoder: FrozenEncoder) -> str:
    """The embedding the encoder's own model pools (timm's ``global_pool``): the mean of the patch
    tokens for ``avg`` (SimMIM, I-JEPA, a fine-tuned classifier) or without a CLS token, else the
    CLS token."""
    vit = getattr(encoder, "vit", None)
    return "mean" if not encoder.has_class_token or getattr(vit, "global_pool", None) == "avg" else "cls"


def load_evaluated_encoder(source: str, weights: str | None = None) -> tuple[FrozenEncoder, dict[str, Any]]:
    """The encoder ``source`` names, and a summary of it for the records (method, encoder, step,
    weights).

    source: an ssl-vit ``.ckpt`` or its run folder (its newest complete checkpoint); a folder
        with ``config.json`` and ``model.safetensors`` (an ``ssl-vit export`` or any timm
        ``local-dir`` folder); or ``timm:NAME``.
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
        model = _timm_model(name, timm_weights=weights is None, source=source)
        return _with_weights(timm_encoder(model), weights, source), {**info, "weights": weights or "timm"}
    source = resolve_run_folder(source)
    path = Path(source)
    if path.is_dir():
        pickled = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pth", ".pt"))
        if (path / "config.json").is_file() and not (path / "model.safetensors").is_file() and pickled:
            raise UserError(
                f"{path} holds its weights pickled ({pickled[0]}), which can run code when loaded; ssl-vit reads "
                "model.safetensors only: save them so (safetensors.torch.save_file) where you trust them"
            )
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            raise UserError(
                f"{path} is not a timm model folder (config.json + model.safetensors) nor a run folder "
                "(checkpoints/); pass an ssl-vit .ckpt, its run folder, a folder written by `ssl-vit export`, "
                "or timm:NAME"
            )
        config = json.loads((path / "config.json").read_text())
        # Other weights in the folder's architecture: not what the folder's run trained, nor at its step.
        provenance = config.get("ssl_vit", {}) if weights is None else {}
        info = {
            "method": provenance.get("objective", "timm"),
            "encoder": {"name": config.get("architecture"), **config.get("model_args", {})},
            "step": provenance.get("step"),
        }
        model = _timm_model(f"local-dir:{path}", timm_weights=weights is None, source=source)
        return _with_weights(timm_encoder(model), weights, source), {**info, "weights": weights or str(path)}
    if path.is_file():
        if weights is None:
            encoder, info = load_checkpoint_encoder(path)
            return encoder, {**info, "weights": str(path)}
        ckpt = read_checkpoint(path, mmap=True)
        encoder = ViTEncoder(**ckpt["hyper_parameters"]["encoder"])
        info = {"method": "ViT", "encoder": dict(ckpt["hyper_parameters"]["encoder"]), "step": None}
        return _with_weights(encoder, weights, source), {**info, "weights": weights}
    raise missing_source(source)


def _timm_model(name: str, timm_weights: bool, source: str) -> nn.Module:
    """timm's model, without a classifier; a ViT taking any resolution (as ``ViTEncoder`` does)."""
    try:
        try:
            return timm.create_model(name, pretrained=timm_weights, num_classes=0, dynamic_img_size=True)
        except TypeError:  # not a ViT: a CNN takes any resolution as it is
            return timm.create_model(name, pretrained=timm_weights, num_classes=0)
    except (OSError, RuntimeError, ValueError) as err:  # no cached weights offline, a folder timm cannot read
        raise UserError(
            f"timm could not build {source} with its weights ({last_line(err)}); pass --weights FILE for weights you "
            "have, or --weights random for the architecture at random initialisation"
        ) from err


def _with_weights(encoder: FrozenEncoder, weights: str | None, source: str) -> FrozenEncoder:
    """``encoder`` as built (its own or random weights), or with the weights file loaded."""
    if weights is None or weights == "random":
        return encoder
    if not isinstance(encoder, ViTProperties):
        raise UserError(
            f"--weights {weights}: weights files load into ViTs only; {source} is a {type(encoder.model).__name__}, "
            "pass the folder `ssl-vit distill` exported instead"
        )
    try:
        encoder.vit.load_state_dict(encoder_state_dict(weights, encoder.vit, resample_patches=False))
    except RuntimeError as err:
        raise UserError(f"--weights {weights} do not fit {source}'s architecture: {last_line(err)}") from err
    return encoder


def standalone_record_stem(source: str, out_dir: str | Path | None = None) -> Path:
    """Where a standalone evaluation of ``source`` writes its records: beside a checkpoint
    (``last`` for ``last.ckpt``) or beside an export folder (``export`` for ``runs/x/export``),
    or in the current folder for ``timm:NAME`` (``NAME``); in ``out_dir`` if given."""
    timm_name = source.startswith(TIMM_PREFIX)
    # a folder given as "." or ".." is named by where it is: its records go beside it
    path = Path(source[len(TIMM_PREFIX) :]) if timm_name else Path(os.path.abspath(source))
    stem = path.with_suffix("") if path.suffix == ".ckpt" else path
    return Path(out_dir) / stem.name if out_dir else stem
