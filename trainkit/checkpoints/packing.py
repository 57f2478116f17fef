"""One portable file per checkpoint: `model.ckpt`, an uncompressed tar of one step dir.

The first member is `trainkit-packed.json` = {"trainkit_packed": 1, "step": 40, "format_version": 1}; the rest are
the step dir's files in sorted order with zeroed mtimes and owners, so packing the same step twice gives the same
bytes. `unpack` extracts safely and checks every file against the step's `manifest.json`. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import posixpath
import tarfile
import uuid

from trainkit.checkpoints.layout import directory_atomically, step_dir_name
from trainkit.errors import TrainkitError
from trainkit.checkpoints.manifest import read_manifest, verify_manifest

MARKER_NAME = "trainkit-packed.json"
PACK_VERSION = 1
_MAX_MARKER_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class PackInfo:
    """What the marker of a packed file says."""

    step: int
    format_version: int


def _not_packed(file: os.PathLike | str, why: str) -> TrainkitError:
    return TrainkitError(
        f"{file} is not a packed trainkit checkpoint ({why}); pass a file made by "
        "`python -m trainkit.ckpt pack`, a workdir or a step dir"
    )


def _tar_info(name: str, *, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.size = 0 if is_dir else size
    info.mode = 0o755 if is_dir else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack(step_dir: os.PathLike | str, out_file: os.PathLike | str) -> pathlib.Path:
    """Write the (verified) step dir `step_dir` as one file `out_file`; return its path.

    Example: `pack("W/checkpoints/000040", "model.ckpt")`. The file is written to a temporary name and renamed,
    so `out_file` is either absent or complete.
    """
    step_dir, out_file = pathlib.Path(step_dir), pathlib.Path(out_file)
    if not step_dir.is_dir():
        raise TrainkitError(f"cannot pack {step_dir}: it is not a directory; pass a step dir like W/checkpoints/000040")
    manifest = read_manifest(step_dir)
    problems = verify_manifest(step_dir)
    if manifest is None or problems:
        raise TrainkitError(
            f"cannot pack {step_dir}: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
            + "; pack a complete, intact step (check with `python -m trainkit.ckpt verify`)"
        )
    marker = json.dumps(
        {"trainkit_packed": PACK_VERSION, "step": int(manifest["step"]),
         "format_version": int(manifest["format_version"])},
        sort_keys=True,
    ).encode()

    entries: list[tuple[str, pathlib.Path]] = []
    for dirpath, dirnames, filenames in os.walk(step_dir):
        dirnames.sort()
        for name in dirnames + filenames:
            full = pathlib.Path(dirpath, name)
            if full.is_symlink() or not (full.is_file() or full.is_dir()):
                raise TrainkitError(f"cannot pack {full}: only regular files and directories can be packed")
            entries.append((full.relative_to(step_dir).as_posix(), full))
    entries.sort()

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{uuid.uuid4().hex}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tar_info(MARKER_NAME, size=len(marker)), io.BytesIO(marker))
            for rel, full in entries:
                if full.is_dir():
                    tar.addfile(_tar_info(rel, is_dir=True))
                else:
                    with open(full, "rb") as f:
                        tar.addfile(_tar_info(rel, size=os.fstat(f.fileno()).st_size), f)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


def _read_marker(tar: tarfile.TarFile, file: os.PathLike | str) -> PackInfo:
    first = tar.next()
    if first is None or first.name != MARKER_NAME or not first.isfile() or first.size > _MAX_MARKER_BYTES:
        raise _not_packed(file, f"its first member is not {MARKER_NAME}")
    try:
        marker = json.loads(tar.extractfile(first).read())  # type: ignore[union-attr]
        if marker.get("trainkit_packed") != PACK_VERSION:
            raise ValueError
        return PackInfo(step=int(marker["step"]), format_version=int(marker["format_version"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _not_packed(file, f"its {MARKER_NAME} is not readable") from None


def _open_tar(file: os.PathLike | str) -> tarfile.TarFile:
    try:
        return tarfile.open(file, "r:")  # uncompressed only: a packed file is never compressed
    except (tarfile.TarError, EOFError, IsADirectoryError):
        raise _not_packed(file, "it is not a tar file") from None


def read_pack_info(file: os.PathLike | str) -> PackInfo:
    """Read only the marker of a packed file (fast); raise TrainkitError if `file` is not one."""
    with _open_tar(file) as tar:
        return _read_marker(tar, file)


def _check_member(member: tarfile.TarInfo, file: os.PathLike | str) -> None:
    name = member.name
    parts = name.split("/")
    if (name.startswith("/") or posixpath.isabs(name) or ".." in parts or "\\" in name or not name.strip("/")
            or name == MARKER_NAME):
        raise _not_packed(file, f"it has an unsafe member name {name!r}")
    if not (member.isfile() or member.isdir()):
        raise _not_packed(file, f"member {name!r} is a link or device, which trainkit never writes")


def unpack(file: os.PathLike | str, dest_dir: os.PathLike | str) -> pathlib.Path:
    """Extract packed `file` into `dest_dir/<step dir name>` (e.g. `dest/000040`), verify it, return that path.

    Refuses absolute or `..` member names, links and devices; every file must match the packed manifest.
    The step dir appears only once complete (extracted to a temporary dir, then renamed).
    """
    file, dest_dir = pathlib.Path(file), pathlib.Path(dest_dir)
    with _open_tar(file) as tar:
        info = _read_marker(tar, file)
        try:
            members = [m for m in tar.getmembers() if m.name != MARKER_NAME]
        except (tarfile.TarError, EOFError):
            raise TrainkitError(f"packed checkpoint {file} is truncated or corrupted; download or pack it again") \
                from None
        for member in members:
            _check_member(member, file)
        final = dest_dir / step_dir_name(info.step)
        if final.exists():
            raise TrainkitError(f"cannot unpack {file}: {final} already exists; delete it or unpack elsewhere")
        dest_dir.mkdir(parents=True, exist_ok=True)
        with directory_atomically(final, "unpacking") as tmp:
            try:
                tar.extractall(tmp, members=members, filter="data")
            except (tarfile.TarError, EOFError, OSError) as e:
                raise TrainkitError(
                    f"packed checkpoint {file} could not be extracted ({type(e).__name__}); "
                    "download or pack it again"
                ) from None
            problems = verify_manifest(tmp)
            manifest = read_manifest(tmp)
            if not problems and manifest is not None and int(manifest["step"]) != info.step:
                problems = [f"manifest.json says step {manifest['step']}, the marker says {info.step}"]
            if problems:
                first = problems[0].replace(f"{tmp}{os.sep}", "")
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise TrainkitError(f"packed checkpoint {file} is damaged: {first}{more}; download or pack it again")
    return final
