"""The workdir: created and checked writable up front, and locked so two runs never share it."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from trainkit.errors import TrainkitError

LOCK_FILE = ".trainkit.lock"


def prepare(workdir: str | Path) -> Path:
    """Create `workdir` if needed and check that it is a writable directory."""
    path = Path(workdir)
    if str(workdir).startswith(("gs://", "s3://")):
        raise TrainkitError(f"workdir {workdir}: pass remote workdirs through etils (gcsfs installed)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainkitError(f"cannot create workdir {path}: {e.strerror}; choose a writable --workdir") from None
    if not path.is_dir():
        raise TrainkitError(f"workdir {path} exists and is not a directory; choose another --workdir")
    if not os.access(path, os.W_OK | os.X_OK):
        raise TrainkitError(f"workdir {path} is not writable; fix its permissions or choose another --workdir")
    return path


def prepare_output(path: str | Path) -> Path:
    """Create the directory of the output file `path` (an -o argument) and check it is writable, up front."""
    path = Path(path)
    blocking = next((p for p in (path.parent, *path.parent.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise TrainkitError(f"cannot write {path}: {blocking} is a file, not a directory; choose another -o path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainkitError(f"cannot write {path}: cannot create {path.parent} ({e.strerror}); "
                            "choose another -o path") from None
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise TrainkitError(f"cannot write {path}: {path.parent} is not writable (read-only or no permission); "
                            "choose another -o path")
    return path


class WorkdirLock:
    """An exclusive flock on W/.trainkit.lock. The kernel drops it when the process dies, so a crashed run
    never leaves the workdir stuck."""

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise TrainkitError(
                f"workdir {self.path.parent} is in use by a running trainkit ({holder}); "
                "wait for it to finish, stop it, or choose another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
