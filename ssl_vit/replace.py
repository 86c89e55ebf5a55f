"""Writing a command's output in one step, and replacing an old one only when it is safe.

``replace_output`` writes the new output under a temporary name beside the target and renames it
into place, so nothing partial is ever at the target. With ``overwrite`` it replaces only an
output of the same kind (an export folder, a shard folder, ...), recognised by the names of the
files in it, and never the current folder, a folder above it or a folder holding what the command
reads: anything else may be someone's data. Used by ``ssl-vit export`` and ``ssl-vit shards``;
it depends on nothing else in ssl-vit, so both can import it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ssl_vit.errors import UserError

log = logging.getLogger(__name__)
#: Where ``OutputKind.seal`` keeps the files' SHA-256 in the record file.
WRITTEN_FILES_KEY = "sha256_as_written"


@dataclass(frozen=True)
class OutputKind:
    """What a command writes: a folder holding only files named like ``names`` (glob patterns),
    or, with ``folder=False``, one file named like them."""

    what: str  # said in messages: "an export folder"
    names: tuple[str, ...]
    folder: bool = True
    required: tuple[str, ...] = ()  # files every such folder holds: a folder without one is someone else's
    #: A JSON file of the folder in which ``replace_output`` records the SHA-256 of the others as
    #: written: one changed since (an edited model card) is the user's work, not to be replaced.
    record: str | None = None
    #: For a file output: why a file so named is not one ssl-vit wrote (None when it is).
    unwritten: Callable[[Path], str | None] | None = None

    def foreign(self, path: Path) -> str | None:
        """Why the existing ``path`` is not an output of this kind (None when it is one)."""
        if not self.folder:
            if path.is_dir():
                return "it is a folder"
            if not self._named(path):
                return f"it is not a {' or '.join(self.names)} file"
            return self.unwritten(path) if self.unwritten else None
        if not path.is_dir():
            return "it is a file"
        others = sorted(entry for entry in path.iterdir() if entry.is_dir() or not self._named(entry))
        checkpoints = [entry for entry in others if entry.suffix == ".ckpt"]
        if checkpoints:
            return f"it also holds the checkpoint {checkpoints[0].name}"
        if others:
            return f"it also holds {others[0].name}{'/' if others[0].is_dir() else ''}"
        missing = [name for name in self.required if not (path / name).is_file()]
        if missing and any(path.iterdir()):
            return f"it has no {missing[0]}"
        written = self._written(path)
        if self.record and (path / self.record).is_file() and not written:  # a folder ssl-vit did not seal
            return f"its {self.record} does not say which files ssl-vit wrote"
        added = sorted(entry.name for entry in path.iterdir() if written and entry.name not in written)
        if added:
            return f"it also holds {added[0]}, which ssl-vit did not write there"
        edited = [
            name for name, digest in written.items() if (path / name).is_file() and self._sha256(path / name) != digest
        ]
        if edited:
            return f"its {edited[0]} was changed since ssl-vit wrote it"
        return None

    def seal(self, folder: Path) -> None:
        """Record in ``record`` the SHA-256 of the folder's other files, as just written."""
        if self.record is None:
            return
        record = folder / self.record
        content = json.loads(record.read_text())
        others = sorted(p for p in folder.iterdir() if p.is_file() and p.name != self.record)
        content[WRITTEN_FILES_KEY] = {p.name: file_sha256(p) for p in others} | {self.record: _entries_sha256(content)}
        record.write_text(json.dumps(content, indent=2))

    def _sha256(self, path: Path) -> str | None:
        """A file's SHA-256 as ``seal`` records it: the record's of its entries but the digests."""
        if path.name != self.record:
            return file_sha256(path)
        try:
            return _entries_sha256(json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    def _written(self, folder: Path) -> dict[str, str]:
        """The SHA-256 of each file as written, by name ({} for outputs written before they were kept)."""
        try:
            return dict(json.loads((folder / self.record).read_text()).get(WRITTEN_FILES_KEY, {}))
        except (TypeError, OSError, ValueError, AttributeError):  # no record kind, no record file, not JSON
            return {}

    def _named(self, path: Path) -> bool:
        return any(fnmatch.fnmatchcase(path.name, pattern) for pattern in self.names)


def _entries_sha256(content: dict) -> str:
    """The SHA-256 of a record's entries, its ``WRITTEN_FILES_KEY`` left out."""
    entries = {key: value for key, value in content.items() if key != WRITTEN_FILES_KEY}
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def check_replaceable(out: str | Path, kind: OutputKind, overwrite: bool, reads: Iterable[str | Path] = ()) -> None:
    """Raise a ``UserError`` unless ``out`` may be written: it does not exist, or is an empty
    folder where ``kind`` is a folder, or (with ``overwrite``) is an output of ``kind`` and, if it
    is in a run folder (beside ``checkpoints/``), of a run ``reads`` is in; and it is neither the
    current folder, nor one above it, nor the same as or above a path in ``reads``."""
    target = output_path(out)
    real, here = target.resolve(), Path.cwd().resolve()
    if real == here or real in here.parents:
        raise UserError(f"{out} is the current folder or holds it; name a new folder for the output instead")
    for source in map(Path, reads):
        if real == source.resolve() or real in source.resolve().parents:
            relation = "is" if real == source.resolve() else "holds"
            raise UserError(f"{out} {relation} {source}, which this command reads; write the output somewhere else")
    if not os.path.lexists(target):
        return
    run = real.parent
    if (run / "checkpoints").is_dir() and not any(run in source.resolve().parents for source in map(Path, reads)):
        raise UserError(
            f"{out} is an output of the run in {run} (beside its checkpoints/), which that run's summary and "
            "records name; only a command reading that run's checkpoints replaces it: write to another path"
        )
    reason = kind.foreign(target)
    empty_folder = target.is_dir() and not any(target.iterdir())
    if reason and (overwrite or empty_folder):
        holds_more = kind.folder and target.is_dir() and reason.startswith(("it also holds", "its "))  # and more
        raise UserError(
            f"{out} is not {'only ' if holds_more else ''}{kind.what}: {reason}; --overwrite replaces only what "
            f"ssl-vit writes, so {'move that out or ' if holds_more else ''}choose another path"
        )
    if not (overwrite or empty_folder):
        advice = "choose another path" if reason else "choose another path or pass --overwrite"
        raise UserError(f"{out} already exists and is not empty; {advice}")


def replace_output(
    out: str | Path,
    write: Callable[[Path], None],
    kind: OutputKind,
    overwrite: bool,
    reads: Iterable[str | Path] = (),
) -> Path:
    """Check ``out`` (``check_replaceable``), run ``write(new)`` and move ``new`` to ``out``.

    ``new`` is an empty folder to fill (for a file output, the path of the file to write) inside
    a temporary folder beside ``out``, never inside it. An old output is renamed aside into that
    temporary folder, the new one renamed in, and the old one removed last, with the temporary
    folder: if anything fails, the old output is in place, whole, and nothing is left beside it.
    """
    target = output_path(out)
    recover_interrupted_replacements(target)
    check_replaceable(out, kind, overwrite, reads)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{writer_id()}.", suffix=".partial", dir=target.parent))
    except OSError as err:
        raise UserError(f"cannot write to {target.parent}: {err.strerror}") from err
    new, old = staging / "new", staging / "old"
    try:
        if kind.folder:
            new.mkdir()  # not the staging folder itself, which mkdtemp makes private to its owner
        write(new)
        kind.seal(new)
        give_default_permissions(new)
        try:  # again: what the user (or another command) put at out while this one wrote is theirs
            check_replaceable(out, kind, overwrite, reads)
        except UserError as err:
            raise UserError(f"while this command wrote, {err}; nothing was written") from None
        try:
            _move_into_place(new, target, old)
        except OSError as err:
            where = f"the old one is at {old}" if os.path.lexists(old) else "it is left as it was"
            raise UserError(f"cannot replace {out}: {err.strerror}; {where}, check permissions and retry") from err
    finally:
        if not os.path.lexists(old) or os.path.lexists(target):  # never delete the only copy of the old output
            shutil.rmtree(staging, ignore_errors=True)
    return Path(out)


def output_path(out: str | Path) -> Path:
    """Where an output goes: ``out`` made absolute ("sub/.." has no name of its own to put a
    temporary one beside), or for a link, the path it points to (the link is the user's)."""
    target = Path(os.path.abspath(out))
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def file_sha256(path: Path) -> str:
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            sha256.update(block)
    return sha256.hexdigest()


def this_host() -> str:
    """The host's name as temporary names carry it (no dots, which separate their parts)."""
    return socket.gethostname().replace(".", "_")


def writer_id() -> str:
    """``host-pid``: names a temporary file or folder after the process writing it, so that one
    left by a killed writer is known for one (:func:`process_exists`)."""
    return f"{this_host()}-{os.getpid()}"


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover_interrupted_replacements(target: Path) -> None:
    """Clear what writers of ``target`` on this host left when they were killed: an old output a
    replacement had moved aside, with nothing in its place, is put back; the rest is removed."""
    host = this_host()
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.partial")
    for staging in target.parent.glob(f".{glob.escape(target.name)}.*.partial") if target.parent.is_dir() else ():
        match = pattern.fullmatch(staging.name)
        if match is None or match["host"] != host or process_exists(int(match["pid"])):
            continue
        old = staging / "old"
        if os.path.lexists(old) and not os.path.lexists(target):
            os.rename(old, target)
            log.warning("put back %s, which a replacement killed before its end had moved aside", target)
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(new: Path, target: Path, old: Path) -> None:
    """Rename ``target`` (if there is one) to ``old`` and ``new`` to ``target``; if the second
    rename fails, rename ``old`` back."""
    if os.path.lexists(target):
        os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        if os.path.lexists(old):
            os.rename(old, target)
        raise


@contextlib.contextmanager
def file_in_one_step(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; when the block ends it is renamed
    to ``path`` with the user's default permissions, and removed if the block fails: a reader never
    sees half a file."""
    tmp = path.with_name(f".{path.name}.{writer_id()}.tmp")
    try:
        yield tmp
        give_default_permissions(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def give_default_permissions(path: Path) -> None:
    """Give ``path`` (a file, or every file in a folder) the permissions a new file of the user's
    gets: 0o666 less the umask. Files written through a private temporary file (``mkstemp``,
    safetensors' ``save_file``) are readable by their owner alone, and an export or a result is
    often shared with others."""
    mask = os.umask(0)
    os.umask(mask)
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        os.chmod(file, 0o666 & ~mask)
