"""Checkpoints: written whole or not at all, found again after a crash, read back safely
(tensors and plain containers only), and the encoders read back out of them."""

from __future__ import annotations

import glob
import os
import pickle
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ssl_vit.encoder import ViTEncoder
from ssl_vit.errors import UserError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, except that a checkpoint appears under its name only when it is
    complete: it is written to a temporary file in the same folder, flushed to disk and renamed
    over the target. (Lightning's own local save goes through a temporary file in /tmp, which is
    copied, not renamed, when /tmp is another filesystem, and is not flushed.) Loads use
    ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the atomic unit there
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = True) -> Any:
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def newest_complete_checkpoint(*patterns: str | Path) -> Path | None:
    """The most recently written checkpoint matching any of the glob ``patterns`` that reads as a
    whole checkpoint; newer ones that do not (truncated, half-copied) are passed over with a warning."""
    candidates = {Path(p) for pattern in patterns for p in glob.glob(str(pattern))}
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:  # mmap reads the archive's index (at its end) without loading the tensors
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return path
        except Exception as err:
            rank_zero_warn(
                f"skipping checkpoint {path}: it is incomplete or unreadable ({type(err).__name__}); "
                "falling back to the previous one"
            )
    return None


def rng_states() -> dict[str, Any]:
    """The process's random number generator states, as tensors and plain values (so they load
    with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus what a run needs to survive being stopped: checkpoints
    hold the RNG states (a resumed run draws the same random numbers), and a SIGTERM (a scheduler
    pre-empting the job, a SLURM requeue) saves ``last.ckpt`` after the step in flight, before
    the process exits."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        rng = state.pop("rng", None)
        super().load_state_dict(state)
        if rng is not None:
            set_rng_states(rng)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or self.dirpath is None:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        rank_zero_warn(
            f"received SIGTERM at step {trainer.global_step}: saved {path}; run the same command again to resume"
        )


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
