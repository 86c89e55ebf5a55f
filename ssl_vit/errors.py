"""The one exception type users see as a message rather than a traceback, and how messages count."""

import hashlib
import multiprocessing as mp


class UserError(Exception):
    """Something in the user's input is wrong (config, data, paths).

    The message says what was wrong and what to do; the CLI prints it on one line and exits 2.
    """


def last_line(err: BaseException) -> str:
    """An exception's message in one line (its last: torch and timm end with the cause), or its
    type when it has none."""
    text = str(err).strip()
    return text.splitlines()[-1].strip() if text else type(err).__name__


def cause_of(err: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` in ``err``'s chain (its causes and contexts): torch's checkpoint writer
    turns a KeyboardInterrupt or a full disk in the middle of its write into a RuntimeError
    ("unexpected pos"), and jsonargparse wraps a recipe's errors in its own."""
    while err is not None:
        if isinstance(err, kind):
            return err
        err = err.__cause__ or err.__context__
    return None


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 image``, ``2 images`` (``plural`` where it is not the noun and an s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def first_few(items: list[str], most: int = 3) -> str:
    """``a; b; c; and 2 more``: what a message names of a long list."""
    return "; ".join(items[:most]) + (f"; and {len(items) - most} more" if len(items) > most else "")


#: What this process (a run) has named already (skipped samples, files left out, data said to be
#: odd): hashes of the names, in memory shared with the loader workers it forks.
_named_skips = mp.Array("q", 4096, lock=False)
_named_count = mp.Value("l", 0)


def first_time_named(name: str) -> bool:
    """Whether ``name`` was not named before in this process (and is now recorded as named)."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little", signed=True)
    with _named_count.get_lock():
        count = _named_count.value
        if count >= len(_named_skips) or key in _named_skips[:count]:
            return False
        _named_skips[count] = key
        _named_count.value = count + 1
    return True
