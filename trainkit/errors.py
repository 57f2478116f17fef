"""User-facing errors: one line naming the cause and the fix, a non-zero exit, no traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])

EXIT_USER_ERROR = 2


class TrainkitError(Exception):
    """An error caused by the user's input; the CLI prints it on one line and exits 2.

    The message names the cause and the fix, e.g.
    `TrainkitError("--config file configs/nope.py does not exist; pass a path like configs/default.py")`.
    """


def fail(message: str) -> None:
    """Print `message` on one line to stderr and exit with the user-error code."""
    print(f"trainkit: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def exits_cleanly(fn: F) -> F:
    """Decorate a CLI entry point: a TrainkitError becomes one stderr line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TrainkitError as e:
            fail(str(e))

    return wrapper  # type: ignore[return-value]
