"""User-facing errors: one line naming the cause and the fix, a non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from typing import Callable, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., object])

EXIT_USER_ERROR = 2
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How the same errors read when tensorstore (under Orbax) reports them as a ValueError.
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", f"os_error_code='{errno.ENOSPC}'",
                    f"os_error_code='{errno.EDQUOT}'")


class TrainkitError(Exception):
    """An error caused by the user's input; the CLI prints it on one line and exits 2.

    The message names the cause and the fix, e.g.
    `TrainkitError("--config file configs/nope.py does not exist; pass a path like configs/default.py")`.
    """


def is_disk_full(error: BaseException | None) -> bool:
    """True if `error`, or an exception it was raised from, is ENOSPC / EDQUOT (disk full, quota exceeded)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in _DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def fail(message: str, *, now: bool = False) -> None:
    """Print `message` on one line to stderr and exit with the user-error code.

    `now` skips the exit handlers, as a kill would (tests/fault shows that is safe): after a full disk they would
    only retry the writes that failed (TensorBoard's last events), each with a traceback.
    """
    print(f"trainkit: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    if now:
        sys.stdout.flush()
        os._exit(EXIT_USER_ERROR)
    sys.exit(EXIT_USER_ERROR)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are trainkit's one line (`trainkit: error: ...`, exit code 2)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message}; run `{self.prog} --help` for the usage")
        raise AssertionError("unreachable")


def exits_cleanly(fn: F) -> F:
    """Decorate a CLI entry point: a TrainkitError (or a full disk) becomes one stderr line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if is_disk_full(e):
                where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
                fail(str(e) if isinstance(e, TrainkitError) else f"no space left on device{where}; free disk space "
                     "(or write to another disk) and run the same command again", now=True)
            if isinstance(e, TrainkitError):
                fail(str(e))
            raise

    return wrapper  # type: ignore[return-value]
