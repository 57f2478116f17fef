"""Paths as users type them, made absolute once at the boundary (command line, Python API).

Orbax (and every later `os.chdir`, subprocess or thread) needs absolute paths; users type `runs/digits`,
`./runs/x/` or `~/runs/x`. Each path is made absolute once, by the first function that takes it from a person:
the public entry points (`train_and_evaluate`, `resolve_source` for every SOURCE, `export_checkpoint`,
`plot_runs`), which the commands call, and the commands themselves for paths they use directly (`ckpt ls` and
`pack -o`, the flags `launch` passes on). Nothing below them sees a relative path. URLs (`gs://`, `https://`,
`hf://`, ...) pass through.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence


def is_local(path: str | os.PathLike) -> bool:
    """True for a path on this machine's filesystem, False for gs://, https://, hf://, s3://, ..."""
    return "://" not in os.fspath(path)


def absolute_path(path: str | os.PathLike) -> str:
    """`path` with `~` expanded, made absolute against the current directory, normalised (`./runs/x/` ->
    `/cwd/runs/x`); symlinks are kept as given. URLs are returned unchanged.

        absolute_path("runs/digits")   # '/home/me/project/runs/digits'
    """
    text = os.fspath(path)
    if not is_local(text) or not text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def default_cache_dir() -> pathlib.Path:
    """Where trainkit caches downloads, unpacked checkpoints and gs:// staging: `$TRAINKIT_CACHE` if set, else
    `~/.cache/trainkit` (absolute)."""
    return pathlib.Path(absolute_path(os.environ.get("TRAINKIT_CACHE") or "~/.cache/trainkit"))


def absolute_flags(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """`argv` with the values of the flags `names` made absolute, in both `--name=value` and `--name value`
    forms; a `--config=FILE:ARG` keeps its `:ARG`.

        absolute_flags(["--workdir=runs/a"], ["--workdir"])   # ['--workdir=/cwd/runs/a']
    """
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name in names and eq:
            out[i] = f"{name}={_absolute_value(name, value)}"
        elif arg in names and i + 1 < len(out):
            out[i + 1] = _absolute_value(arg, out[i + 1])
    return out


def _absolute_value(name: str, value: str) -> str:
    if name == "--config":  # FILE[:ARG]
        file, colon, arg = value.partition(":")
        return absolute_path(file) + colon + arg
    return absolute_path(value)


def absolute_optional(path: str | os.PathLike | None) -> str | None:
    """`absolute_path` for optional flags: None stays None."""
    return None if path is None else absolute_path(path)
