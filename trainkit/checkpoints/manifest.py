"""`manifest.json`: the size and checksum of every file in a finished step dir, written once and verified later.

```
{"format_version": 2, "step": 40, "files": {"state/_METADATA": {"size": 1234, "crc32c": "1a2b3c4d"}, ...}}
```

Format 2 (trainkit's current) records crc32c; format 1 recorded sha256, and both are verified (each entry names
its checksum). Why crc32c: the manifest is written on every save, reading back files that are still in the page
cache, and on this machine's Xeon (SSE4.2/PCLMUL, SHA-NI) one core checksums 1 GiB in 0.09 s with crc32c
(google-crc32c, 11 GB/s) vs 0.56 s with sha256 (1.8 GB/s) and 1.1 s with blake2b (0.9 GB/s); zlib.crc32 ran
3.6 GB/s, xxh3 25 GB/s (not a dependency here; crc32c is already fast next to the write). A checksum is enough
against torn, truncated or bit-rotted files, which is what the manifest is for; it is also what GCS checks on
every object. Packed files (`model.ckpt`) and downloads keep sha256: they are named and shared by their hash.

Paths are relative to the step dir with `/` separators. Works on local paths and `etils.epath` paths (gs://).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import google_crc32c
from etils import epath

from trainkit.checkpoints.layout import write_atomically
from trainkit.paths import is_local

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
# hashlib and google-crc32c release the GIL on large updates, so a few threads hash several files at disk speed.
_HASH_THREADS = min(8, os.cpu_count() or 1)
CHECKSUM = "crc32c"  # what new manifests record (format 2); format 1 recorded "sha256"


def _open(path: epath.Path):
    return open(path, "rb") if is_local(path) else path.open("rb")


def file_crc32c(path: epath.PathLike) -> str:
    """Hex crc32c (Castagnoli, as GCS computes it) of a file, read in 4 MiB chunks."""
    crc = 0
    path = epath.Path(path)
    with _open(path) as f:
        while chunk := f.read(4 * _CHUNK):
            crc = google_crc32c.extend(crc, chunk)
    return f"{crc:08x}"


def file_sha256(path: epath.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    path = epath.Path(path)
    with _open(path) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


CHECKSUMS: dict[str, Callable[[epath.PathLike], str]] = {"crc32c": file_crc32c, "sha256": file_sha256}


def list_files(root: epath.PathLike) -> list[str]:
    """Every regular file under `root` as sorted `/`-separated relative paths (symlinks are skipped locally)."""
    root = epath.Path(root)
    out = []
    if is_local(root):
        top = os.fspath(root)
        for dirpath, _, filenames in os.walk(top):
            for name in filenames:
                full = os.path.join(dirpath, name)
                if os.path.isfile(full) and not os.path.islink(full):
                    out.append(os.path.relpath(full, top).replace(os.sep, "/"))
        return sorted(out)
    # Not `epath.Path.walk`: through fsspec it yields directories without their gs:// prefix.
    pending = [("", root)]
    while pending:
        prefix, directory = pending.pop()
        for child in directory.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                pending.append((rel + "/", child))
            else:
                out.append(rel)
    return sorted(out)


def _size(path: epath.Path) -> int:
    return os.path.getsize(path) if is_local(path) else path.stat().length


def write_manifest(step_dir: epath.PathLike, *, step: int, format_version: int) -> dict:
    """Checksum every file in `step_dir` (except the manifest) and write `step_dir/manifest.json` atomically.

    Call it after the save is finished. Returns the manifest as a dict.
    Example: `write_manifest("W/checkpoints/000040", step=40, format_version=2)`.
    """
    step_dir = epath.Path(step_dir)
    names = [n for n in list_files(step_dir) if n != MANIFEST_NAME and not _is_own_tmp(n)]
    checksum = CHECKSUMS[CHECKSUM]
    with ThreadPoolExecutor(min(_HASH_THREADS, max(len(names), 1))) as pool:
        digests = list(pool.map(lambda n: checksum(step_dir / n), names))
    files = {n: {"size": _size(step_dir / n), CHECKSUM: d} for n, d in zip(names, digests)}
    manifest = {"format_version": int(format_version), "step": int(step), "files": files}
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    write_atomically(step_dir / MANIFEST_NAME, text)
    return manifest


def _is_own_tmp(name: str) -> bool:
    return name.startswith(f".{MANIFEST_NAME}.tmp-")


def read_manifest(step_dir: epath.PathLike) -> dict | None:
    """The parsed manifest of `step_dir`, or None when it has none or it is unreadable."""
    path = epath.Path(step_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None
    return manifest


def verify_manifest(step_dir: epath.PathLike, *, hashes: bool = True) -> list[str]:
    """Compare `step_dir` with its manifest; return one line per problem, naming the file (empty = intact).

    Problems: the manifest is missing or unreadable, a file is missing, a size differs, a checksum differs (the
    one each entry records: crc32c in format 2, sha256 in format 1). Files not listed in the manifest are not
    reported. Sizes are checked first; only same-size files are hashed, and none with `hashes=False` (a quick
    check that reads no file contents).
    """
    step_dir = epath.Path(step_dir)
    manifest_path = step_dir / MANIFEST_NAME
    if not manifest_path.exists():
        return [f"{manifest_path} is missing (the save did not finish, or this step predates manifests)"]
    manifest = read_manifest(step_dir)
    if manifest is None:
        return [f"{manifest_path} is not a valid trainkit manifest (corrupted or truncated)"]
    problems: list[str] = []
    to_hash: list[tuple[str, str, str]] = []
    for name, entry in sorted(manifest["files"].items()):
        if name.startswith("/") or ".." in name.split("/"):
            problems.append(f"{manifest_path} lists the unsafe path {name!r} (corrupted or forged)")
            continue
        path = step_dir / name
        try:
            size = _size(path)
        except (FileNotFoundError, NotADirectoryError):
            problems.append(f"{path} is missing")
            continue
        if size != entry["size"]:
            problems.append(f"{path} is {size} bytes, the manifest says {entry['size']} (truncated or modified)")
        elif hashes:
            kind = next((k for k in CHECKSUMS if isinstance(entry.get(k), str)), None)
            if kind is None:
                problems.append(f"{manifest_path} records no checksum for {name!r} (corrupted or forged)")
            else:
                to_hash.append((name, kind, entry[kind]))
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(lambda item: CHECKSUMS[item[1]](step_dir / item[0]), to_hash))
    for (name, kind, expected), actual in zip(to_hash, digests):
        if actual != expected:
            problems.append(
                f"{step_dir / name} has {kind} {actual[:12]}, the manifest says {expected[:12]} "
                "(corrupted or modified)"
            )
    return sorted(problems)
