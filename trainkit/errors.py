"""User-facing errors: one line naming the cause and the fix, a non-zero exit, no traceback."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import os
import re
import sys
from typing import Callable, NoReturn, TypeVar

F = TypeVar("F", bound=Callable[..., object])

EXIT_USER_ERROR = 2
# The errors of a disk that cannot take a write, whoever's fault: what each means, for the one-line message.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "input/output error (a failing disk or network filesystem)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='?(\d+)")  # how tensorstore's errors carry the errno


class TrainkitError(Exception):
    """An error caused by the user's input; the CLI prints it on one line and exits 2.

    The message names the cause and the fix, e.g.
    `TrainkitError("--config file configs/nope.py does not exist; pass a path like configs/default.py")`.
    """


@dataclasses.dataclass(frozen=True)
class WriteError:
    """What a failed write says once it is understood: the errno, the path (when known), the cause in words."""

    errno: int
    path: str | None

    @property
    def cause(self) -> str:
        return WRITE_ERRNOS[self.errno] + (f" ({self.path})" if self.path else "")

    @property
    def disk_full(self) -> bool:
        return self.errno in _DISK_FULL_ERRNOS


def find_write_error(error: BaseException | None) -> WriteError | None:
    """The WriteError in `error` or an exception it was raised from (an OSError, or tensorstore's ValueError
    under Orbax, which carries the errno as text), else None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return WriteError(error.errno, error.filename if isinstance(error.filename, str) else None)
        text = str(error)
        match = _TENSORSTORE_ERRNO.search(text)
        if match and int(match.group(1)) in WRITE_ERRNOS:
            return WriteError(int(match.group(1)), None)
        for code in _DISK_FULL_ERRNOS:  # as Orbax words a full disk in its own errors
            if os.strerror(code) in text:
                return WriteError(code, None)
        error = error.__cause__ or error.__context__
    return None


def is_disk_full(error: BaseException | None) -> bool:
    """True if `error`, or an exception it was raised from, is ENOSPC / EDQUOT (disk full, quota exceeded)."""
    found = find_write_error(error)
    return found is not None and found.disk_full


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
            found = find_write_error(e)
            if found is not None:  # after a failed write the exit handlers would only retry it (or hang on it)
                fix = ("free disk space (or write to another disk)" if found.disk_full else
                       "make that disk writable again (a read-only remount, a permission change or a failing disk)")
                fail(str(e) if isinstance(e, TrainkitError) else f"{found.cause}; {fix} and run the same command "
                     "again", now=True)
            if isinstance(e, TrainkitError):
                fail(str(e))
            raise

    return wrapper  # type: ignore[return-value]
