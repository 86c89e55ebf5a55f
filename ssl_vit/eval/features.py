"""Frozen-encoder features for evaluation: pooling options, extraction from labelled shards
through the evaluation view, and a safetensors cache so several probes reuse one pass."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ssl_vit.data.pipeline import NO_LABEL, View, eval_loader
from ssl_vit.data.shards import data_fingerprint, resolve_shards
from ssl_vit.encoder import NO_CLASS_TOKEN
from ssl_vit.errors import UserError, first_time_named
from ssl_vit.replace import file_in_one_step

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # ssl_vit.eval.encoders loads weights through ssl_vit.export, which imports this package
    from ssl_vit.eval.encoders import FrozenEncoder

Pooling = Literal["cls", "mean", "cls+mean"]
TokenPooling = Literal["cls", "mean", "cls+mean", "patches"]  # patches: (B, N, D), for token probes


class FeatureSet(NamedTuple):
    features: Tensor  # (N, D) float32; (N, L, D) for patch tokens
    labels: Tensor  # (N,) int64
    tokens: Tensor | None = None  # (N, L, D) the last block's patch tokens, when kept from the same pass


def pooled_features(
    encoder: FrozenEncoder, images: Tensor, pooling: TokenPooling = "cls", last_blocks: int = 1
) -> Tensor:
    """One vector per image: the CLS token, the mean of the patch tokens, or both concatenated;
    or, with ``pooling="patches"``, all patch tokens of the last block (B, N, D).

    With ``last_blocks = n > 1`` the CLS part is the concatenation of the final-normed CLS tokens
    of the last n blocks (DINO's ``n_last_blocks``); the mean is always over the last block.
    """
    pooled, patches = pooled_and_patches(encoder, images, pooling, last_blocks)
    return patches if pooling == "patches" else pooled


def pooled_and_patches(
    encoder: FrozenEncoder, images: Tensor, pooling: TokenPooling = "cls", last_blocks: int = 1
) -> tuple[Tensor, Tensor]:
    """:func:`pooled_features` and the last block's patch tokens, from one forward pass."""
    if pooling not in ("cls", "mean", "cls+mean", "patches"):
        raise UserError(f"unknown pooling {pooling!r}; use cls, mean or cls+mean")
    if pooling.startswith("cls") and not encoder.has_class_token:
        raise UserError(NO_CLASS_TOKEN)
    if last_blocks > 1 and not hasattr(encoder, "vit"):
        raise UserError(f"last_blocks {last_blocks} reads a ViT's blocks; this encoder is not a ViT: use last_blocks 1")
    if last_blocks > 1 and last_blocks > len(encoder.vit.blocks):
        raise UserError(f"last_blocks is {last_blocks}, but the encoder has {len(encoder.vit.blocks)} blocks")
    if last_blocks == 1:
        out = encoder(images)
        patches = out.patches
        cls = out.cls if pooling.startswith("cls") else None
    else:
        per_block = encoder.vit.forward_intermediates(
            images, indices=last_blocks, norm=True, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
        cls = torch.cat([prefix[:, 0] for _, prefix in per_block], dim=-1) if pooling.startswith("cls") else None
        patches = per_block[-1][0]
    if pooling == "cls":
        return cls, patches
    if pooling == "mean" and last_blocks == 1 and getattr(getattr(encoder, "vit", None), "global_pool", None) == "avg":
        return encoder.vit.forward_head(out.tokens, pre_logits=True), patches  # timm's, fc_norm included
    if pooling == "mean":
        return patches.mean(dim=1), patches
    if pooling == "cls+mean":
        return torch.cat([cls, patches.mean(dim=1)], dim=-1), patches
    return patches, patches


@torch.no_grad()
def frozen_features(
    encoder: FrozenEncoder, images: Tensor, pooling: TokenPooling = "cls", last_blocks: int = 1
) -> Tensor:
    """Pooled float32 features of a batch through the frozen encoder, on its device (bf16
    autocast on GPU)."""
    return frozen_pooled_and_patches(encoder, images, pooling, last_blocks)[0]


@torch.no_grad()
def frozen_pooled_and_patches(
    encoder: FrozenEncoder, images: Tensor, pooling: TokenPooling = "cls", last_blocks: int = 1
) -> tuple[Tensor, Tensor]:
    """:func:`frozen_features` and the last block's patch tokens (as computed: bf16 on GPU), from
    one forward pass."""
    device = next(encoder.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pooled, patches = pooled_and_patches(encoder, images.to(device, non_blocking=True), pooling, last_blocks)
    return pooled.float(), patches


@torch.no_grad()
def extract_features(
    encoder: FrozenEncoder,
    shards: str,
    view: View,
    pooling: TokenPooling = "cls",
    last_blocks: int = 1,
    batch_size: int = 256,
    num_workers: int = 2,
    masks: bool = False,
    token_bytes: int = 0,
) -> FeatureSet:
    """Features and labels of every sample of labelled ``shards``, in a fixed order, on the
    encoder's device (bf16 autocast on GPU); with ``masks`` the labels are the samples' label
    maps, (N, H, W), through the same view as the images. With ``token_bytes``, the same pass
    also keeps the last block's patch tokens (``tokens``) for the token probes, unless they
    would take more than that many bytes."""
    urls, _ = resolve_shards(shards)
    loader = eval_loader(urls, view, batch_size, num_workers, masks=masks)
    was_training = encoder.training
    encoder.eval()
    features, labels, tokens = [], [], []
    kept_bytes = 0
    try:
        for images, batch_labels in loader:
            pooled, patches = frozen_pooled_and_patches(encoder, images, pooling, last_blocks)
            features.append(pooled.cpu())
            labels.append(batch_labels)
            kept_bytes += patches.numel() * 4  # as kept: float32
            if token_bytes and kept_bytes <= token_bytes:  # converted only when kept
                tokens.append(patches.float().cpu())
    finally:
        encoder.train(was_training)
    if not features:
        raise UserError(f"no readable samples in {shards!r}; an evaluation split cannot be empty")
    kept = torch.cat(tokens) if token_bytes and kept_bytes <= token_bytes else None
    result = FeatureSet(torch.cat(features), torch.cat(labels).long(), kept)
    return result if masks else labelled_only(result, shards)


def labelled_only(result: FeatureSet, shards: str) -> FeatureSet:
    """``result`` without the images of ``shards`` that have no class (said once), which k-NN and
    the probes cannot score; none with a class is one line saying what labels are."""
    labelled = result.labels != NO_LABEL
    if not labelled.any():
        raise UserError(
            f"{shards} has no image with a class; k-NN and the probes need labelled images (one sub-folder per class, "
            "or an integer cls per sample)"
        )
    if not labelled.all():  # some samples of labelled shards have none (left out when written, or broken)
        if first_time_named(f"unlabelled in {shards}"):
            log.warning(
                "%s: %d of %d images have no class and are left out of k-NN and the probes",
                shards,
                int((~labelled).sum()),
                len(labelled),
            )
        tokens = result.tokens[labelled] if result.tokens is not None else None
        result = FeatureSet(result.features[labelled], result.labels[labelled], tokens)
    return result


def feature_cache_files(
    cache_dir: str | Path,
    encoder: FrozenEncoder,
    splits: dict[str, str],
    image_size: int,
    pooling: Pooling,
    last_blocks: int,
) -> dict[str, Path]:
    """Where each split's pooled features are cached (``splits``: name -> shards), named by a hash
    of everything they depend on (the encoder's architecture and weights, the data as it is now,
    the crop size, the pooling), so that another model, other weights or changed images never read
    them back."""
    # "full decode": features cached before JPEGs were decoded whole for evaluation are not read back
    digest = hashlib.sha256(
        json.dumps([type(encoder).__name__, image_size, pooling, last_blocks, "full decode"]).encode()
    )
    digest.update(json.dumps(architecture(encoder)).encode())
    for name, tensor in encoder.state_dict().items():
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    files = {}
    for split, shards in splits.items():
        key = digest.copy()
        key.update(data_fingerprint(shards).encode())
        files[split] = Path(cache_dir) / f"{split}-{pooling}-last{last_blocks}-{key.hexdigest()[:16]}.safetensors"
    return files


def architecture(module: nn.Module) -> list[Any]:
    """What a module computes besides its weights' names and shapes: each submodule's class and
    plain settings (a ViT's attention heads, a norm's epsilon), which weights of the same shapes
    share across architectures."""
    return [
        [name, type(sub).__name__, sorted((k, repr(v)) for k, v in vars(sub).items() if _is_setting(k, v))]
        for name, sub in module.named_modules()
    ]


def _is_setting(name: str, value: Any) -> bool:
    # training (the mode) and fused_attn (how attention runs, not what it computes) change no feature
    plain = isinstance(value, (int, float, bool, str, tuple, type(None)))
    return plain and not name.startswith("_") and name not in ("training", "fused_attn")


def save_features(path: str | Path, features: FeatureSet) -> None:
    """Whole or not at all: an interrupted write leaves no cache file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_in_one_step(path) as tmp:
        save_file({"features": features.features.contiguous(), "labels": features.labels.contiguous()}, str(tmp))


def load_features(path: str | Path) -> FeatureSet:
    tensors = load_file(str(path))
    return FeatureSet(tensors["features"], tensors["labels"])
