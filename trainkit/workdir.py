"""The workdir: created and checked writable up front, and locked so two runs never share it.

A workdir is a local directory or a gs:// prefix. On gs:// Orbax writes the checkpoints straight to the bucket
(every process its own shards); the small files trainkit writes as it goes (metrics.jsonl, TensorBoard events,
the final exports) are written to a local staging dir first and uploaded (see `Staged`), because an object
store has no append and no rename.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import logging
import os
import pathlib
import re
import socket
import time
import uuid
from pathlib import Path

from etils import epath

from trainkit.paths import default_cache_dir, is_local
from trainkit.errors import TrainkitError

LOCK_FILE = ".trainkit.lock"
REMOTE_SCHEMES = ("gs://",)
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]")


def prepare(workdir: str | os.PathLike) -> epath.Path:
    """Create `workdir` if needed and check that it is a writable directory (local) or a usable bucket (gs://)."""
    if not is_local(workdir):
        return _prepare_remote(os.fspath(workdir))
    path = Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainkitError(f"cannot create workdir {path}: {e.strerror}; choose a writable --workdir") from None
    if not path.is_dir():
        raise TrainkitError(f"workdir {path} exists and is not a directory; choose another --workdir")
    if not os.access(path, os.W_OK | os.X_OK):
        raise TrainkitError(f"workdir {path} is not writable; fix its permissions or choose another --workdir")
    return epath.Path(path)


def _prepare_remote(workdir: str) -> epath.Path:
    if not workdir.startswith(REMOTE_SCHEMES):
        raise TrainkitError(f"workdir {workdir}: only local paths and gs:// are supported; choose another --workdir")
    try:
        import gcsfs  # noqa: F401  # epath reaches gs:// through gcsfs (or tf.io.gfile when TensorFlow is installed)
    except ImportError:
        raise TrainkitError("gs:// workdirs need gcsfs; pip install 'trainkit[gcs]'") from None
    bucket = workdir.removeprefix("gs://").split("/")[0]
    if not _BUCKET_NAME.fullmatch(bucket):
        raise TrainkitError(f"workdir {workdir}: {bucket!r} is not a valid GCS bucket name (3-63 characters: lowercase "
                            "letters, digits, '-', '_', '.'); use gs://BUCKET/path/to/run")
    path = epath.Path(workdir.rstrip("/"))
    # Probe with one small object write, not mkdir: gcsfs's mkdir would *create* a missing bucket (a typo'd name
    # would become a new bucket in your project). Objects need no parent directories on GCS.
    probe = path / f".trainkit-probe-{uuid.uuid4().hex}"
    gcsfs_log = logging.getLogger("gcsfs")
    level = gcsfs_log.level
    gcsfs_log.setLevel(logging.CRITICAL)  # its retries log tracebacks; the one-line error below says it all
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except FileNotFoundError:
        raise TrainkitError(f"bucket gs://{bucket} does not exist (workdir {workdir}); create it (gcloud storage "
                            "buckets create gs://" + bucket + ") or fix the name in --workdir") from None
    except Exception as e:  # noqa: BLE001 - auth, network and bucket errors come as many exception types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TrainkitError(f"cannot write to workdir {workdir} ({reason}); check the bucket name and your "
                            "credentials (gcloud auth application-default login)") from None
    finally:
        gcsfs_log.setLevel(level)
    return path


def display_name(workdir: epath.PathLike) -> str:
    """A workdir's name for labels (W&B run, plot legend): the last part of its resolved path or gs:// prefix."""
    return pathlib.Path(workdir).resolve().name if is_local(workdir) else epath.Path(workdir).name


def staging_dir(workdir: epath.Path) -> pathlib.Path:
    """The local directory that stands in for a gs:// workdir's small files; the workdir itself when local."""
    if is_local(workdir):
        return pathlib.Path(workdir)
    key = hashlib.sha256(os.fspath(workdir).encode()).hexdigest()[:16]
    path = default_cache_dir() / "workdirs" / f"{workdir.name}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Staged:
    """Files written locally under `staging_dir(workdir)` and mirrored to a gs:// workdir: `sync()` uploads every
    file (whole objects; an object store has no append) in a background thread, at most every `every_s` seconds
    unless `force`; `close()` uploads what is left and waits. For a local workdir every call is a no-op.

    A failed upload is a warning and is retried at the next sync: a run does not die for a metrics upload. If the
    last upload (at `close`) fails, `strict` makes it an error naming the local copy; otherwise a warning does."""

    def __init__(self, workdir: epath.Path, subpaths: tuple[str, ...], every_s: float = 30.0, strict: bool = False):
        self.remote = None if is_local(workdir) else workdir
        self.local = staging_dir(workdir)
        self._subpaths, self._every_s, self._strict = subpaths, every_s, strict
        self._last = time.monotonic()
        self._uploader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trainkit-upload")
        self._pending: concurrent.futures.Future | None = None

    def sync(self, *, force: bool = False) -> None:
        if self.remote is None or (not force and time.monotonic() - self._last < self._every_s):
            return
        self._last = time.monotonic()
        if self._pending is not None:
            if not self._pending.done() and not force:
                return  # the running upload sends the newest bytes it finds; the next sync catches up
            if failure := self._pending.result():
                print(f"trainkit: warning: {failure}; retrying now", flush=True)
        self._pending = self._uploader.submit(self._upload)

    def _upload(self) -> str | None:
        """Upload every staged file (on the one uploader thread: uploads never overlap); the failure, if any."""
        for sub in self._subpaths:
            local = self.local / sub
            files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
            for file in files:
                target = self.remote / file.relative_to(self.local).as_posix()
                try:
                    upload(file, target)
                except Exception as e:  # noqa: BLE001 - network, auth and quota errors come as many types
                    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    return f"uploading {file.name} to {target} failed ({reason})"
        return None

    def close(self) -> None:
        try:
            if self.remote is not None:
                self.sync(force=True)  # warns if the previous upload failed; this one retries it
                failure = self._pending.result()
                if failure and self._strict:
                    raise TrainkitError(f"{failure}; the files are in {self.local}: copy them to {self.remote} "
                                        "or run the same command again")
                if failure:
                    print(f"trainkit: warning: {failure}; the local copy is in {self.local}", flush=True)
        finally:
            self._uploader.shutdown()


def upload(local: pathlib.Path, remote: epath.Path) -> None:
    """Copy one local file to a gs:// path: one object write (readers see the old or the new object); an object
    needs no parent directories."""
    remote.write_bytes(local.read_bytes())


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
    never leaves the workdir stuck. gs:// has no locks: there, the scheduler that starts the job keeps it single
    (a lease object would outlive a preempted VM and block its own restart)."""

    def __init__(self, workdir: epath.Path):
        self.path = Path(workdir) / LOCK_FILE if is_local(workdir) else None
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        if self.path is None:
            return self
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
