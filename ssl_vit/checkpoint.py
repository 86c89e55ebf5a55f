"""Reading encoders back out of ssl-vit checkpoints, safely (tensors and plain containers only)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from ssl_vit.encoder import ViTEncoder
from ssl_vit.errors import UserError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint written by ``ssl-vit pretrain``, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"{path} is not an ssl-vit checkpoint: it holds more than tensors and plain containers, "
            "and ssl-vit never unpickles arbitrary objects; pass a .ckpt written by `ssl-vit pretrain`"
        ) from err
    except Exception as err:  # torch.load fails in many ways on a file that is not a checkpoint
        raise UserError(
            f"{path} is not an ssl-vit checkpoint: torch.load cannot read it ({type(err).__name__}); "
            "is it truncated, or another kind of file?"
        ) from err
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "state_dict" not in ckpt or "encoder" not in hparams:
        raise UserError(
            f"{path} is not an ssl-vit checkpoint (no encoder settings in it); "
            "pass a .ckpt written by `ssl-vit pretrain`"
        )
    return ckpt


def encoder_weights(ckpt: dict[str, Any], path: str | Path, role: str | None = None) -> tuple[dict[str, Any], str]:
    """The ``ViTEncoder`` state dict of one of a checkpoint's encoders, and its role.

    A method lists its encoders by role in the checkpoint (``ssl_vit.encoders``: role -> module
    path), the one its paper evaluates first; ``role=None`` takes that one.
    """
    encoders = ckpt.get("ssl_vit", {}).get("encoders", {"student": "encoder"})
    role = role or next(iter(encoders))
    if role not in encoders:
        raise UserError(f"{path} has no {role!r} encoder; it has {', '.join(encoders)}")
    prefix = encoders[role] + "."
    weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    return weights, role


def load_checkpoint_encoder(path: str | Path, role: str | None = None) -> tuple[ViTEncoder, dict[str, Any]]:
    """The trained encoder of an ssl-vit checkpoint (by default the one its paper evaluates), and
    a summary of the checkpoint (method, encoder settings, step)."""
    ckpt = read_checkpoint(path)
    encoder, role = checkpoint_encoder(ckpt, path, role)
    info = {
        "method": objective_name(ckpt),
        "encoder": dict(ckpt["hyper_parameters"]["encoder"]),
        "encoder_role": role,
        "step": ckpt.get("global_step"),
    }
    return encoder, info


def checkpoint_encoder(ckpt: dict[str, Any], path: str | Path, role: str | None = None) -> tuple[ViTEncoder, str]:
    """Build a read checkpoint's encoder from its settings and load one of its encoders' weights."""
    encoder = ViTEncoder(**ckpt["hyper_parameters"]["encoder"])
    weights, role = encoder_weights(ckpt, path, role)
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path}: encoder weights do not match its settings (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return encoder, role


def objective_name(ckpt: dict[str, Any]) -> str:
    return (
        ckpt.get("ssl_vit", {}).get("objective") or ckpt["hyper_parameters"].get("_class_path", "?").rsplit(".", 1)[-1]
    )
