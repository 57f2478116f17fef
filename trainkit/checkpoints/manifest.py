"""`manifest.json`: the size and sha256 of every file in a finished step dir, written once and verified later.

```
{"format_version": 1, "step": 40, "files": {"state/_METADATA": {"size": 1234, "sha256": "ab..."}, ...}}
```

Paths are relative to the step dir with `/` separators. Works on local paths and `etils.epath` paths (gs://).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

from etils import epath

from trainkit.checkpoints.layout import write_atomically
from trainkit.paths import is_local

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
# hashlib releases the GIL on large updates, so a few threads hash several files at disk speed.
_HASH_THREADS = min(8, os.cpu_count() or 1)


def file_sha256(path: epath.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    path = epath.Path(path)
    with open(path, "rb") if is_local(path) else path.open("rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


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
    """Hash every file in `step_dir` (except the manifest) and write `step_dir/manifest.json` atomically.

    Call it after the save is finished (`wait_until_finished()`). Returns the manifest as a dict.
    Example: `write_manifest("W/checkpoints/000040", step=40, format_version=1)`.
    """
    step_dir = epath.Path(step_dir)
    names = [n for n in list_files(step_dir) if n != MANIFEST_NAME and not _is_own_tmp(n)]
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(lambda n: file_sha256(step_dir / n), names))
    files = {n: {"size": _size(step_dir / n), "sha256": d} for n, d in zip(names, digests)}
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

    Problems: the manifest is missing or unreadable, a file is missing, a size differs, a sha256 differs.
    Files not listed in the manifest are not reported. Sizes are checked first; only same-size files are hashed,
    and none with `hashes=False` (a quick check that reads no file contents).
    """
    step_dir = epath.Path(step_dir)
    manifest_path = step_dir / MANIFEST_NAME
    if not manifest_path.exists():
        return [f"{manifest_path} is missing (the save did not finish, or this step predates manifests)"]
    manifest = read_manifest(step_dir)
    if manifest is None:
        return [f"{manifest_path} is not a valid trainkit manifest (corrupted or truncated)"]
    problems: list[str] = []
    to_hash: list[tuple[str, str]] = []
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
            to_hash.append((name, entry["sha256"]))
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(lambda item: file_sha256(step_dir / item[0]), to_hash))
    for (name, expected), actual in zip(to_hash, digests):
        if actual != expected:
            problems.append(
                f"{step_dir / name} has sha256 {actual[:12]}..., the manifest says {expected[:12]}... "
                "(corrupted or modified)"
            )
    return sorted(problems)
