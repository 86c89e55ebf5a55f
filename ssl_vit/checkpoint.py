"""Checkpoints: written whole or not at all, found again after a crash, read back safely
(tensors and plain containers only), and the encoders read back out of them."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ssl_vit.data.pipeline import evaluation_split
from ssl_vit.data.shards import data_fingerprint, data_location, is_remote, size_and_time, split_part
from ssl_vit.encoder import ViTEncoder
from ssl_vit.errors import UserError
from ssl_vit.replace import file_in_one_step, file_sha256, process_exists, this_host, writer_id


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, except that a checkpoint appears under its name only when it is
    complete and can be checked whole later: it is written to a temporary file in the same folder
    (named after this writer, so a dead writer's leftovers can be told from a live one's), hashed
    as it is written, flushed to disk, its SHA-256 written beside it (``NAME.sha256``, the format
    ``sha256sum -c`` reads), and renamed over the target. (Lightning's own local save goes through
    a temporary file in /tmp, which is copied, not renamed, when /tmp is another filesystem, and is
    not flushed.) Loads use ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: fsspec's transaction is the atomic unit there
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{writer_id()}.tmp")
        try:
            with open(tmp, "wb") as f:
                hashing = _HashingWriter(f)
                torch.save(checkpoint, hashing)
                f.flush()
                os.fsync(f.fileno())
            # The checksum first: a crash between the two renames leaves a checkpoint whose checksum
            # does not match, which a resume passes over, never a wrong one that matches.
            with file_in_one_step(checksum_path(path)) as checksum:
                checksum.write_text(f"{hashing.sha256.hexdigest()}  {path.name}\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = True) -> Any:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as err:
            raise UserError(not_weights_only_message(path)) from err

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if "://" not in str(path):
            checksum_path(Path(path)).unlink(missing_ok=True)


class _HashingWriter:
    """A file object that hashes what passes through it (what ``torch.save`` needs: ``write``, ``flush``)."""

    def __init__(self, file: Any) -> None:
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


#: A temporary file of ``AtomicCheckpointIO`` (or of ssl-vit before writers were named by host).
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:(?P<host>[^.]+)-)?(?P<pid>\d+)\.tmp")


def checksum_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(f"{checkpoint.name}.sha256")


def remove_dead_writers_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that checkpoint writers on this host left when they were killed
    (their process no longer exists); a live writer's, another host's and anything not named as
    ours (a checkpoint's or its checksum's) are left alone. Returns what was removed."""
    removed = []
    host = this_host()
    for path in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else ():
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or match["host"] not in (None, host) or process_exists(int(match["pid"])):
            continue
        if not match["name"].endswith((".ckpt", ".ckpt.sha256")):  # a file of the user's named alike
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


#: Held by the run training in its folder (``RunCLI``), see :func:`lock_run_folder`.
LOCK_FILE = ".ssl-vit.lock"
_held_locks: list[tuple[int, Path]] = []  # (descriptor, path) of the run folders this process holds


def lock_run_folder(root: str | Path) -> None:
    """Hold ``root``'s lock file until :func:`release_run_folders`: a second run started in the
    same folder stops in one line, naming the first, instead of resuming the first one's
    checkpoints while it trains and writing its checkpoints, export and summary between the first
    one's. The lock is the kernel's (``flock``), so a killed run holds none; the file, with the
    holder's pid, host and start time, is removed when the run ends (a killed run's is taken over)."""
    path = Path(root) / LOCK_FILE
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(
                f"the run folder {root} cannot be written ({err.strerror}); give the run one it can write "
                "(--trainer.default_root_dir DIR)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(
                f"{root} is in use by another run ({holder}); wait for it to end, or give this run a folder of "
                "its own (--trainer.default_root_dir runs/NEW)"
            ) from None
        except OSError as err:  # a filesystem without locks (Lustre mounted without flock, some NFS)
            os.close(fd)
            rank_zero_warn(f"{root} cannot be locked ({err.strerror}): a second run started in it would not be stopped")
            return
        # The holder before us may have removed the file between our open and our lock: lock the file there now.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M')}\n".encode(), 0)
    _held_locks.append((fd, path))


def release_run_folders() -> None:
    """Remove the lock files of the run folders this process holds and release them (the end of
    a run, however it ends short of a kill)."""
    while _held_locks:
        fd, path = _held_locks.pop()
        path.unlink(missing_ok=True)  # while still held: no other run holds this file meanwhile
        os.close(fd)  # closing the descriptor releases its flock


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (``None`` when it can): its content does not match the
    checksum written with it, or, for a checkpoint written without one, it does not load whole.
    Judged once per version of the file and of its checksum: a command that names a run folder
    twice reads a multi-GB checkpoint through once."""
    checksum = checksum_path(path)
    stats = [f.stat() if f.is_file() else None for f in (path, checksum)]
    versions = [(st.st_ino, st.st_size, st.st_mtime_ns) if st else None for st in stats]
    return _checkpoint_problem(path.resolve(), *versions)


@functools.lru_cache(maxsize=64)
def _checkpoint_problem(path: Path, *versions: tuple[int, int, int] | None) -> str | None:
    checksum = checksum_path(path)
    if checksum.is_file():
        expected = (checksum.read_text().split() or [""])[0]
        return None if file_sha256(path) == expected else f"its content does not match {checksum.name}"
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return "it holds pickled Python objects besides tensors, which ssl-vit never unpickles"
    except Exception as err:
        return f"it is incomplete or unreadable ({type(err).__name__})"
    return None


def checkpoints_in(*places: tuple[str | Path, str]) -> list[Path]:
    """The checkpoints in each ``(folder, pattern)``, newest first: by when the run saved them, as
    each records, else by the file's time (a copy made without keeping times, ``cp -r``, put an
    early checkpoint first). Folders are taken literally (a ``[`` in a run's path is a character,
    not a glob pattern)."""
    found = {p for folder, pattern in places if Path(folder).is_dir() for p in Path(folder).glob(pattern)}
    return sorted((p for p in found if p.is_file()), key=saved_at, reverse=True)


def trainer_settings(trainer: L.Trainer) -> dict[str, Any]:
    """The trainer's settings that shape what a run trains (no limit: -1), for a resume to compare."""
    return {
        "trainer.max_steps": trainer.max_steps,
        "trainer.max_epochs": -1 if trainer.max_epochs is None else trainer.max_epochs,
        "trainer.gradient_clip_val": trainer.gradient_clip_val,
        "trainer.gradient_clip_algorithm": str(trainer.gradient_clip_algorithm),
        "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches,
        "trainer.precision": str(trainer.precision),
        "trainer.limit_train_batches": trainer.limit_train_batches,
        "devices x nodes": trainer.num_devices * trainer.num_nodes,  # the global batch
    }


def saved_at(path: Path) -> float:
    """When a run saved the checkpoint ``path``, as it recorded; the file's time for others."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return float(ckpt[RUN_KEY]["saved_at"])
    except Exception:  # not whole, not ssl-vit's, or saved before the record: its file's time
        return path.stat().st_mtime


def newest_complete_checkpoint(*places: tuple[str | Path, str]) -> Path | None:
    """The most recently written checkpoint in ``places`` (see :func:`checkpoints_in`) that is
    whole; newer ones that are not (truncated, half-copied, a hole in the middle) are passed over
    with a warning."""
    for path in checkpoints_in(*places):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        rank_zero_warn(f"skipping checkpoint {path}: {problem}; falling back to the previous one")
    return None


def run_checkpoint(run: Path, remedy: str = "pass a run folder or a .ckpt") -> Path:
    """The newest complete checkpoint of a run folder (or of a checkpoints folder)."""
    newest = newest_complete_checkpoint((run / "checkpoints", "*.ckpt"), (run, "*.ckpt"))
    if newest is None:
        raise UserError(f"{run} holds no complete checkpoint, nor does {run}/checkpoints; {remedy}")
    return newest


#: What a run reads that can be written many ways (``photos``, ``./photos/``, its full path): a
#: checkpoint records, and a resume compares, where it is, and under the key here, what its files
#: are, so that the same files moved elsewhere (a project moved whole) are the same.
LOCATED = {"train_shards": "train_files", "init_from": "init_files"}


def located(key: str, spec: str) -> str:
    """Where ``spec``, the run's ``train_shards``, ``val_shards`` or ``init_from``, points; timm's names as written."""
    return spec if key == "init_from" and spec.startswith("timm:") else data_location(spec)


def data_settings(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's data settings, with its ``train_shards`` and ``val_shards`` where the run
    found them (made absolute as it saved), not as its command line wrote them: relative to a
    folder that a later command, run from elsewhere, is not in."""
    data = dict(ckpt.get("datamodule_hyper_parameters", {}))
    run = ckpt.get(RUN_KEY, {})
    return data | {key: run[key] for key in ("train_shards", "val_shards") if run.get(key)}


def resume_mismatch(path: Path, ckpt: dict[str, Any], run: dict[str, Any]) -> str | None:
    """What differs between a checkpoint and the run about to resume from it (``None`` if nothing
    does). ``run`` holds what this run was asked for: ``objective``, ``encoder``, and, to resume a
    run automatically, ``train_shards``, ``val_shards`` (which decide the images it trains on),
    ``init_from`` and its ``folder``; a key left out is not compared."""
    hparams = ckpt.get("hyper_parameters", {})
    written: dict[str, Any] = {
        "objective": objective_name(ckpt),
        "encoder": dict(hparams.get("encoder") or {}),
        "train_shards": ckpt.get("datamodule_hyper_parameters", {}).get("train_shards"),
        "init_from": hparams.get("init_from"),
    }
    recorded = ckpt.get(RUN_KEY, {})
    for key in ("objective", "encoder", "train_shards", "init_from"):
        if key not in run:
            continue
        where = recorded.get(key)
        if key in LOCATED and isinstance(run[key], str) and isinstance(written[key], str):
            # a checkpoint of an older ssl-vit records only the words: read from here
            differs = located(key, run[key]) != (where or located(key, written[key]))
            if differs and recorded.get(LOCATED[key]):  # a project moved with its data or weights
                differs = not same_files(key, run[key], recorded[LOCATED[key]])
        else:
            differs = written[key] != run[key] and written[key] != "?"
        if not differs:
            continue
        if key == "encoder":
            keys = sorted(k for k in {*written[key], *run[key]} if written[key].get(k) != run[key].get(k))
            return "its encoder differs in " + ", ".join(
                f"{k} ({written[key].get(k)} there, {run[key].get(k)} here)" for k in keys
            )
        at = f" ({where})" if where and where != written[key] else ""
        return f"its {key} is {written[key]!r}{at}, this run's {run[key]!r}"
    if "val_shards" in run and isinstance(run.get("train_shards"), str) and isinstance(written["train_shards"], str):
        # val_shards decides which images train: all of the data, or all but its held-out tenth
        val = ckpt.get("datamodule_hyper_parameters", {}).get("val_shards")
        # as it was at the save: a `val` folder beside the data, appeared since, would make the split now
        then = (
            recorded.get("trained_part")
            or evaluation_split(recorded.get("train_shards") or written["train_shards"], val)[0]
        )
        now = evaluation_split(run["train_shards"], run["val_shards"])[0]
        if split_part(then)[1] != split_part(now)[1]:
            why = (
                f"data.val_shards {val} -> {run['val_shards']}"
                if val != run["val_shards"]
                else "a val folder beside it"
            )
            return (
                f"it trained on {then}, and this run would train on {now}: {why} decides whether the run holds a "
                "tenth of its data out"
            )
    folder = recorded.get("folder")
    here = Path(run["folder"]).resolve() if "folder" in run else None
    if here is not None and folder is not None and Path(folder) != here:
        if here not in path.resolve().parents:
            return f"it was written by the run in {folder}, not by this run ({here})"
        # Inside this run's folder: the folder moved since, unless this run's own checkpoints lie
        # beside it, which makes it one copied in from another run.
        own = next((p for p in checkpoints_in((path.parent, "*.ckpt")) if written_in(p) == here), None)
        if own is not None:
            return (
                f"it was written by the run in {folder}, and {own.name} beside it by this run ({here}): a "
                "checkpoint of another run, copied in; move it out of the folder"
            )
    return None


def written_in(path: Path) -> Path | None:
    """The run folder that wrote checkpoint ``path``, as it recorded it (None for an unreadable one)."""
    try:
        folder = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(RUN_KEY, {}).get("folder")
    except Exception:  # incomplete, or not a checkpoint at all: it says nothing of its writer
        return None
    return Path(folder) if folder else None


def files_fingerprint(key: str, spec: str) -> str:
    """A hash of the files a run's ``train_shards`` (``data_fingerprint``) or ``init_from`` (a
    weights file, or every file in an export folder: names within it, sizes and modification
    times) names now; the same files moved elsewhere give the same hash."""
    if key == "train_shards":
        return data_fingerprint(spec)
    path = Path(os.path.expanduser(spec))
    if not path.exists():
        raise UserError(f"{spec} does not exist")
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    entries = [(f.relative_to(path.parent if f == path else path).as_posix(), *size_and_time(f)) for f in files]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def same_files(key: str, spec: str, fingerprint: str) -> bool:
    """Whether the local files ``spec`` names now (a folder, or a brace pattern of its tar files)
    are the ones a run recorded (``files_fingerprint``)."""
    if is_remote(spec):
        return False
    try:
        return files_fingerprint(key, spec) == fingerprint
    except (UserError, OSError):  # missing, or not data it can read: not the same
        return False


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


#: Where a checkpoint records the run that wrote it (its run folder).
RUN_KEY = "ssl_vit_run"


def training_over(trainer: L.Trainer) -> bool:
    """Whether the run has reached its step or epoch limit (the fit loop's ``done``, which also
    prints that it stopped)."""
    loop = trainer.fit_loop
    if 0 <= loop.max_steps <= trainer.global_step:
        return True
    return loop.max_epochs is not None and 0 <= loop.max_epochs <= loop.epoch_progress.current.processed


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus what a run needs to survive being stopped: checkpoints
    hold the RNG states (a resumed run draws the same random numbers), and a SIGTERM (a scheduler
    pre-empting the job, a SLURM requeue) saves ``last.ckpt`` after the step in flight, before
    the process exits; so does a first Ctrl-C at a terminal (a second stops at once). They also
    hold the seconds the run has taken to reach them, so that a resumed run's :meth:`seconds`
    counts its earlier sessions too. The final state is saved as soon as training ends, before the
    end-of-run evaluation and export; a run stopped during those does only them when it is started
    again (``RunCLI.stop_if_finished``). A SIGTERM before the session's first step (during the
    evaluation at its start) stops it at once with nothing to save."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seconds_before, self._session_start = 0.0, time.perf_counter()
        self._fingerprints: dict[str, str] = {}  # of the training data and init_from, read at the first save
        # Names the weights a session trains (new at its first step), so that a summary, a record or
        # a card of other weights at the same step (a run rewound by --ckpt_path) is not taken for theirs.
        self.weights_id: str | None = None
        self._trained = self._training_started = False
        #: The recipe settings a resume changed, one line per resume ("at step 33: data.batch_size
        #: 128 -> 64"), kept in the checkpoints for the run's summary; the command line sets the
        #: resume's own before the checkpoint is restored.
        self.settings_changed: list[str] = []
        self.changes_at_resume: str | None = None

    def seconds(self) -> float:
        """Wall-clock seconds of the run: this session's, and the earlier sessions' up to the
        checkpoint it resumed from."""
        return self._seconds_before + time.perf_counter() - self._session_start

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._seconds_before, self._session_start = 0.0, time.perf_counter()
        self.ctrl_c, self._trained, self._training_started = False, False, False
        self._sigterm_at_end = None
        if threading.current_thread() is threading.main_thread():
            # Set before Lightning's: it keeps a handler it finds, and calls it after its own (which
            # only flags the step loop to stop, so the end-of-run work would go on to its end; it is
            # set after the start-of-run evaluation, and unsets the flag, so a SIGTERM there was lost).
            previous = self._sigterm_before = signal.getsignal(signal.SIGTERM)
            self._sigterm_at_end = lambda signum, frame: self._stop_at_end(trainer, previous, signum, frame)
            signal.signal(signal.SIGTERM, self._sigterm_at_end)

    def _stop_at_end(self, trainer: L.Trainer, previous: Any, signum: int, frame: Any) -> None:
        """SIGTERM before the first step or once training is over: nothing is in flight, or the final
        state is saved, so the evaluation and export stop at once (a scheduler's kill follows within
        seconds) and the same command redoes them. Outside a run, the handler that was there before."""
        if self._sigterm_at_end is not None and (not self._training_started or training_over(trainer)):
            raise SIGTERMException
        if self._sigterm_at_end is None:  # the run is over: act as if this handler had never been set
            signal.signal(signal.SIGTERM, previous)
            if previous == signal.SIG_DFL:
                os.kill(os.getpid(), signum)
            elif callable(previous):
                previous(signum, frame)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._ctrl_c_handler, self._training_started = None, True
        # Python's own handler only: a job started in the background ignores Ctrl-C, and stays so.
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._ctrl_c_handler = lambda *_: self._stop_after_this_step(trainer)
            signal.signal(signal.SIGINT, self._ctrl_c_handler)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self._trained:  # before this step's save
            self.weights_id, self._trained = uuid.uuid4().hex, True
        super().on_train_batch_end(trainer, pl_module, *args)

    def _stop_after_this_step(self, trainer: L.Trainer) -> None:
        """Ctrl-C: the step in flight ends and is saved, as on SIGTERM (Lightning stops at the step's
        end, in step on every rank); a KeyboardInterrupt mid-step would leave nothing to save."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if training_over(trainer):  # the end-of-run work: the last step is saved already
            raise KeyboardInterrupt
        self.ctrl_c = True
        trainer._signal_connector.received_sigterm = True  # Lightning's stop-after-the-step flag
        if trainer.is_global_zero:  # every rank gets the terminal's Ctrl-C: one line says it
            print(
                "\nCtrl-C: stopping after this step to save it (Ctrl-C again stops at once, unsaved)", file=sys.stderr
            )

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._sigterm_at_end is not None and signal.getsignal(signal.SIGTERM) is self._sigterm_at_end:
            signal.signal(signal.SIGTERM, self._sigterm_before)  # Lightning's teardown put ours back
        self._sigterm_at_end = None
        handler = getattr(self, "_ctrl_c_handler", None)
        if handler is not None and signal.getsignal(signal.SIGINT) is handler:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "rng": rng_states(), "seconds": self.seconds()}
        return state | {"settings_changed": list(self.settings_changed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        rng = state.pop("rng", None)
        self._seconds_before = state.pop("seconds", 0.0)
        self.settings_changed = [*state.pop("settings_changed", []), *filter(None, [self.changes_at_resume])]
        super().load_state_dict(state)
        if rng is not None:
            set_rng_states(rng)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_KEY] = {
            "saved_at": time.time(),  # which is newest, whatever a copy did to the files' times
            "folder": str(Path(trainer.default_root_dir).resolve()),
            "weights_id": self.weights_id,
            # what the run set out to take, so that a card of its weights can say when it stopped short
            "planned_steps": planned if math.isfinite(planned := trainer.estimated_stepping_batches) else None,
            # what shapes its training, which a resume may change: its length (and schedules), clipping, batch
            "trainer": trainer_settings(trainer),
        }
        data = getattr(getattr(trainer, "datamodule", None), "hparams", {})
        given = {
            "train_shards": data.get("train_shards"),
            "val_shards": data.get("val_shards"),
            "init_from": pl_module.hparams.get("init_from"),
        }
        checkpoint[RUN_KEY] |= {key: located(key, spec) for key, spec in given.items() if isinstance(spec, str)}
        if isinstance(given["train_shards"], str):  # the images it trains on: all, or all but the held-out tenth
            trained = evaluation_split(given["train_shards"], given["val_shards"])[0]
            checkpoint[RUN_KEY]["trained_part"] = located("train_shards", trained)
        for key, spec in given.items():  # the same files, moved, are the same data and weights
            if key not in LOCATED or not isinstance(spec, str) or is_remote(spec) or spec.startswith("timm:"):
                continue
            if key not in self._fingerprints:  # once a run: it stats every file
                try:
                    self._fingerprints[key] = files_fingerprint(key, spec)
                except (UserError, OSError):  # files gone mid-run: the checkpoint is saved all the same
                    self._fingerprints[key] = ""
            checkpoint[RUN_KEY][LOCATED[key]] = self._fingerprints[key] or None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # A checkpoint saved after its epoch ended (at the end of a run, below) resumes at the next
        # epoch's first batch. With trainer.max_steps set, Lightning restores any checkpoint as if
        # mid-epoch: the finished epoch's batch count would carry into the next epoch, which then
        # yields only the batches left of that count (1 of 4 in the run that showed it).
        self.weights_id = checkpoint.get(RUN_KEY, {}).get("weights_id")
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        epochs, batches = loop.get("epoch_progress", {}).get("current"), loop.get("epoch_loop.batch_progress")
        if epochs and batches and epochs["processed"] == epochs["ready"]:
            batches["current"] = dict.fromkeys(batches["current"], 0)
            batches["is_last_batch"] = False

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        # Training is over (the fit loop ends the epoch at the step limit too): its final state is
        # kept before the end-of-run evaluation, pictures and export, which can take long.
        if self.save_last and training_over(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Saved again after the end-of-run evaluation, whose results (the k-NN curve) the
        # callbacks' state then holds for a run continued longer. (Lightning itself saves last.ckpt
        # at the end only if it never saved one.)
        self._last_global_step_saved = -1
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._sigterm_at_end = None  # Lightning's teardown puts it back, as the handler it found: now inert
        if isinstance(exception, KeyboardInterrupt):  # Ctrl-C may land mid-step: nothing is saved from it
            if not self._training_started:
                rank_zero_warn(self._nothing_trained("interrupted", trainer))
                return
            if training_over(trainer) and self.dirpath is not None:  # its last update is whole: saved if not yet
                path = self._last_step_saved(trainer)
                rank_zero_warn(
                    f"interrupted after the last step ({trainer.global_step}), saved in {path}; run the same command "
                    "again to do the end-of-run evaluation and export"
                )
                return
            newest = self.last_model_path or "none yet: it would start afresh"
            rank_zero_warn(
                f"interrupted at step {trainer.global_step}; run the same command again to resume from the "
                f"newest checkpoint ({newest})"
            )
            return
        if not isinstance(exception, SIGTERMException) or self.dirpath is None:
            return
        exception.signum = signal.SIGINT if self.ctrl_c else signal.SIGTERM  # the command's exit status
        stopped = "stopped by Ctrl-C" if self.ctrl_c else "received SIGTERM"
        if not self._training_started:
            rank_zero_warn(self._nothing_trained(stopped, trainer))
            return
        if training_over(trainer):
            rank_zero_warn(
                f"{stopped} after the last step ({trainer.global_step}), saved in {self._last_step_saved(trainer)}; "
                "run the same command again to do the end-of-run evaluation and export"
            )
            return
        path = self._last_step_saved(trainer)
        rank_zero_warn(f"{stopped} at step {trainer.global_step}: saved {path}; run the same command again to resume")

    def _last_step_saved(self, trainer: L.Trainer) -> str:
        """``last.ckpt`` of the step the run is at, saved now unless it was already (a run stopped
        in the validation at its last step's end, before the epoch's end saved it)."""
        if self._last_global_step_saved == trainer.global_step and self.last_model_path:
            return self.last_model_path
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path, weights_only=False)  # the whole state (Lightning logs a line when not told)
        return str(path)

    @staticmethod
    def _nothing_trained(stopped: str, trainer: L.Trainer) -> str:
        """The line for a session stopped before its first step: the state is the one it started
        from (its global step is not restored yet, so it reads 0 on a resume too)."""
        again = f"resume from {trainer.ckpt_path}" if trainer.ckpt_path else "start it"
        return f"{stopped} before the first step: nothing new to save; the same command will {again}"


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint written by ``ssl-vit pretrain``, loaded with ``weights_only=True``
    (with ``mmap``, its tensors are read only when used: enough to read its settings)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    ckpt = load_weights_file(path, "an ssl-vit checkpoint", "pass a .ckpt written by `ssl-vit pretrain`", mmap)
    hparams = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "state_dict" not in ckpt or "encoder" not in hparams:
        raise UserError(
            f"{path} is not an ssl-vit checkpoint (no encoder settings in it); "
            "pass a .ckpt written by `ssl-vit pretrain`"
        )
    return ckpt


def load_weights_file(path: Path, what: str, remedy: str, mmap: bool = False) -> Any:
    """``torch.load`` of tensors and plain containers only; anything else is one line naming the
    file as not ``what``, with ``remedy``."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive (older versions, a pickle)
        raise UserError(f"{path} is not {what}: torch.save did not write it; {remedy}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UserError(f"{not_weights_only_message(path)}; {remedy}") from err
    except Exception as err:  # torch.load fails in many ways on a file that is not a checkpoint
        raise UserError(
            f"{path} is not {what}: torch.load cannot read it ({type(err).__name__}); "
            f"is it truncated, or another kind of file? {remedy}"
        ) from err


def not_weights_only_message(path: Any) -> str:
    return (
        f"{path} holds pickled Python objects besides tensors and plain containers; ssl-vit never "
        "unpickles those (they can run code), so it cannot read this file"
    )


def encoder_weights(ckpt: dict[str, Any], path: str | Path, role: str | None = None) -> tuple[dict[str, Any], str]:
    """The ``ViTEncoder`` state dict of one of a checkpoint's encoders, and its role.

    A method lists its encoders by role in the checkpoint (``ssl_vit.encoders``: role -> module
    path), the one its paper evaluates first; ``role=None`` takes that one.
    """
    encoders = ckpt.get("ssl_vit", {}).get("encoders", {"encoder": "encoder"})
    if len(encoders) == 1 and role in ("student", "encoder"):  # one encoder: "student" in older checkpoints
        role = None
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
    trained = {FINE_TUNING: ("a fine-tuning", "the classifier"), DISTILLATION: ("a distillation", "the student")}
    if objective_name(ckpt) in trained:  # a timm model of its own, not an ssl-vit ViT encoder
        run = Path(path).parent.parent if Path(path).parent.name == "checkpoints" else Path(path).parent
        kind, model = trained[objective_name(ckpt)]
        raise UserError(
            f"{path} is {kind} run's checkpoint, not a pretraining run's: {model} it trained is the timm folder "
            f"the run exported, {run / 'export'}, which ssl-vit knn and "
            f'timm.create_model("local-dir:{run / "export"}", pretrained=True) load'
        )
    encoder = ViTEncoder(**ckpt["hyper_parameters"]["encoder"])
    weights, role = encoder_weights(ckpt, path, role)
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path}: encoder weights do not match its settings (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return encoder, role


def verdict_path(checkpoint: Path) -> Path:
    """Where a run records, beside its last checkpoint, whether it failed (``last.verdict.json``)."""
    return checkpoint.with_name(f"{checkpoint.stem}.verdict.json")


def write_verdict(checkpoint: Path, step: int, weights_id: str | None, failed: str | None) -> None:
    record = {"step": step, "weights_id": weights_id, "failed": failed}
    with file_in_one_step(verdict_path(checkpoint)) as path:
        path.write_text(json.dumps(record, indent=1))


def of_these_weights(record: dict[str, Any], ckpt: dict[str, Any], step_key: str = "step") -> bool:
    """Whether a run's end-of-run record (its summary, its verdict) is of ``ckpt``'s weights at
    its step: not of a checkpoint trained on from since, nor of one rewound by --ckpt_path and
    trained again to the same step (other weights)."""
    ran = ckpt.get(RUN_KEY, {}).get("weights_id")
    return record.get(step_key) == ckpt.get("global_step") and record.get("weights_id", ran) == ran


def failed_verdict(checkpoint: Path, ckpt: dict[str, Any]) -> str | None:
    """Why the run that ended with ``checkpoint`` (read: ``ckpt``) failed, if it did, as it
    recorded at its end: of these weights at this step only."""
    path = verdict_path(checkpoint)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record.get("failed") if of_these_weights(record, ckpt) else None


def ending_summary(checkpoint: Path, ckpt: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The ``summary.json`` of the run that ``checkpoint`` (read: ``ckpt``, or read here) ends,
    when it names that checkpoint at its step and weights (not a ``last.ckpt`` that a later
    session trained on from, and stopped)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):  # the run folder, or its checkpoints/
        summary = folder / "summary.json"
        if summary.is_file():
            record = json.loads(summary.read_text())
            if Path(record.get("checkpoint") or "").name != checkpoint.name:
                return None
            try:
                ckpt = ckpt or read_checkpoint(checkpoint, mmap=True)
            except UserError:  # not a checkpoint of this run's
                return None
            return record if of_these_weights(record, ckpt, "steps") else None
    return None


#: What ``objective_name`` calls a checkpoint of ``ssl-vit finetune``.
FINE_TUNING = "FineTune"
DISTILLATION = "Distill"


def objective_name(ckpt: dict[str, Any]) -> str:
    """The objective a checkpoint was trained with; ``?`` where it does not say."""
    hparams = ckpt.get("hyper_parameters", {})
    if "_class_path" not in hparams and "num_classes" in hparams:  # ssl-vit finetune's (no subclass mode)
        return FINE_TUNING
    return ckpt.get("ssl_vit", {}).get("objective") or hparams.get("_class_path", "?").rsplit(".", 1)[-1]
