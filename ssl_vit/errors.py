"""The one exception type users see as a message rather than a traceback, and how messages count."""


class UserError(Exception):
    """Something in the user's input is wrong (config, data, paths).

    The message says what was wrong and what to do; the CLI prints it on one line and exits 2.
    """


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 image``, ``2 images`` (``plural`` where it is not the noun and an s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def first_few(items: list[str], most: int = 3) -> str:
    """``a; b; c; and 2 more``: what a message names of a long list."""
    return "; ".join(items[:most]) + (f"; and {len(items) - most} more" if len(items) > most else "")
