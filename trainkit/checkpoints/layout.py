"""Step directories and alias pointer files inside `W/checkpoints/` — the one implementation everybody uses.

```
W/checkpoints/000040/                          # a complete step (Orbax renamed it into place / committed it)
W/checkpoints/000080.orbax-checkpoint-tmp-17   # a save that never finished: never listed
W/checkpoints/last                             # alias: a small file whose content is "000040\n"
```

Aliases are files rather than symlinks so that they work on gs://. Every function takes a local path or an
`etils.epath` path (gs://...).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Iterator

from etils import epath

from trainkit.errors import TrainkitError
from trainkit.paths import is_local

ALIAS_NAMES = ("last", "best", "final")
STEP_DIR_DIGITS = 6  # matches CheckpointManagerOptions(step_format_fixed_length=6)

# Orbax marks a finished save either by the atomic rename (local disks) or, where rename is not atomic (GCS),
# by this file; trainkit's manifest is written only after the save finished.
_COMMIT_MARKERS = ("commit_success.txt", "manifest.json")
_ALIAS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
MAX_ALIAS_BYTES = 64  # an alias file holds a step name; anything larger is not an alias


def step_dir_name(step: int) -> str:
    """The directory name Orbax gives `step`, e.g. `step_dir_name(40) == "000040"`."""
    return f"{step:0{STEP_DIR_DIGITS}d}"


def is_complete_step_dir(path: epath.PathLike) -> bool:
    """True if `path` is a finished Orbax step directory (all-digit name; committed when not local)."""
    path = epath.Path(path)
    if not path.name.isdigit() or not path.is_dir():
        return False
    return is_local(path) or any((path / marker).exists() for marker in _COMMIT_MARKERS)


def list_steps(checkpoints_dir: epath.PathLike) -> list[int]:
    """Steps of the complete step dirs in `checkpoints_dir`, ascending; unfinished (tmp) saves are skipped.

    Example: `list_steps("W/checkpoints") == [40, 80]`. A missing directory has no steps.
    """
    checkpoints_dir = epath.Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoints_dir.iterdir() if is_complete_step_dir(p))


def find_step_dir(checkpoints_dir: epath.PathLike, step: int) -> epath.Path | None:
    """The complete step dir holding `step` (normally `000040`), or None if there is none."""
    checkpoints_dir = epath.Path(checkpoints_dir)
    preferred = checkpoints_dir / step_dir_name(step)
    if is_complete_step_dir(preferred):
        return preferred
    if not checkpoints_dir.is_dir():
        return None
    # A step saved without the fixed-length format (e.g. "40") is still that step.
    for p in checkpoints_dir.iterdir():
        if p.name.isdigit() and int(p.name) == step and is_complete_step_dir(p):
            return p
    return None


def _check_alias_name(name: str) -> None:
    if not _ALIAS_NAME.match(name):
        raise TrainkitError(
            f"alias name {name!r} is not valid; use a short name of letters, digits, '-' or '_' such as "
            f"{', '.join(ALIAS_NAMES)}"
        )


def parse_alias(text: str, where: str) -> int:
    """The step that an alias file's content names (`"000040\\n"` → 40); `where` names the file in errors."""
    content = text.strip()
    if not content.isdigit():
        raise TrainkitError(
            f"alias file {where} does not hold a step name (it should contain e.g. '000040'); "
            "delete it or rewrite it with write_alias"
        )
    return int(content)


def read_alias(checkpoints_dir: epath.PathLike, name: str) -> int | None:
    """The step that alias `name` (`last`, `best`, `final`) points at, or None if the alias does not exist.

    The step dir itself may have been deleted since; check with `find_step_dir`.
    """
    _check_alias_name(name)
    path = epath.Path(checkpoints_dir) / name
    if not path.is_file():
        return None
    if path.stat().length > MAX_ALIAS_BYTES:
        raise TrainkitError(f"alias file {path} is too large to be an alias; delete it or rewrite it")
    return parse_alias(path.read_text(), os.fspath(path))


def write_alias(checkpoints_dir: epath.PathLike, name: str, step: int) -> None:
    """Point alias `name` at `step`, atomically: readers see the old or the new step, never a partial file.

    Example: `write_alias("W/checkpoints", "best", 40)` writes `W/checkpoints/best` = "000040\\n".
    """
    _check_alias_name(name)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    checkpoints_dir = epath.Path(checkpoints_dir)
    target = checkpoints_dir / name
    write_atomically(target, step_dir_name(step) + "\n")


@contextlib.contextmanager
def directory_atomically(final: pathlib.Path, purpose: str) -> Iterator[pathlib.Path]:
    """A temporary directory beside local `final` to fill in the block; renamed to `final` when the block ends
    without an error and removed otherwise, so that `final` appears only complete (an unpack, a copy)."""
    tmp = final.parent / f".{final.name}.{purpose}-{uuid.uuid4().hex}"
    try:
        yield tmp
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_atomically(target: epath.Path, text: str) -> None:
    """Write `text` so readers see the old file or the new one, never a torn one: tmp file + fsync + rename
    locally; one object upload on an object store (a rename there would be a copy plus a delete)."""
    if not is_local(target.parent):
        target.write_text(text)
        return
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
