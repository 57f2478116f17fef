"""What the fault tests check after every injected fault: only complete steps are listed, the state equals an
uninterrupted run's bit for bit, and disk usage stays within the retention policy. Plus a real small disk."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from conftest import ROOT, cli_env

from trainkit.checkpoints.layout import list_steps, step_dir_name
from trainkit.checkpoints.manifest import verify_manifest

TMP_MARK = ".orbax-checkpoint-tmp"


def start_training(workdir: Path, *args: str, log: Path, config: str = "configs/default.py",
                   **env: str) -> subprocess.Popen:
    """`python -m trainkit.main` in the background, stdout and stderr appended to `log` (unbuffered); `env` adds
    environment variables (an LD_PRELOAD shim, say)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "trainkit.main", f"--config={config}", f"--workdir={workdir}", *args],
            cwd=ROOT, env=cli_env(PYTHONUNBUFFERED="1", **env), stdout=out, stderr=subprocess.STDOUT,
        )


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def unfinished_saves(checkpoints: Path) -> list[Path]:
    return [p for p in checkpoints.iterdir() if TMP_MARK in p.name] if checkpoints.is_dir() else []


def assert_only_complete_steps(checkpoints: Path) -> list[int]:
    """Every listed step is a finished Orbax save (its manifest or `_CHECKPOINT_METADATA` is there), and the newest
    one, which a restart resumes from, is intact: its manifest verifies, or it has none yet (killed between
    Orbax's commit and the manifest; the next start writes it). Returns the listed steps."""
    steps = list_steps(checkpoints)
    for step in steps:
        step_dir = checkpoints / step_dir_name(step)
        assert (step_dir / "manifest.json").exists() or (step_dir / "_CHECKPOINT_METADATA").exists(), \
            f"partial step listed: {step_dir} has {sorted(p.name for p in step_dir.iterdir())}"
    if steps:
        newest = checkpoints / step_dir_name(steps[-1])
        if (newest / "manifest.json").exists():
            assert verify_manifest(newest) == [], verify_manifest(newest)
    return steps


def state_arrays(workdir: Path, step: int) -> list[np.ndarray]:
    import jax

    from trainkit.checkpoints.manager import read_state_arrays

    return jax.tree.leaves(read_state_arrays(Path(workdir) / "checkpoints" / step_dir_name(step)))


def assert_same_state(workdir: Path, reference: Path, step: int) -> None:
    """The whole TrainState of `step` (params, optimizer, step, rng) is bit-identical in both workdirs."""
    got, want = state_arrays(workdir, step), state_arrays(reference, step)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b), "the state differs from the uninterrupted run's"


def can_mount() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` (e.g. "3m") mounted at `path`: writes past it fail with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def resize(path: Path, size: str) -> None:
    """Free space the way an operator would: grow the filesystem."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill(path: Path, leave_bytes: int) -> Path:
    """Fill the filesystem of `path` with a ballast file until only about `leave_bytes` are free."""
    ballast = path / "ballast"
    st = os.statvfs(path)
    with open(ballast, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(0, st.f_bavail * st.f_frsize - leave_bytes))
    return ballast


def build_shim(directory: Path, source: str) -> Path:
    """An LD_PRELOAD shim compiled from tests/fault/`source` (a .c file beside this one) into `directory`; the
    calling test skips where there is no gcc."""
    import shutil

    import pytest

    if shutil.which("gcc") is None:
        pytest.skip("building the LD_PRELOAD shim needs gcc")
    out = directory / Path(source).with_suffix(".so").name
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), str(Path(__file__).with_name(source)), "-ldl"],
                   check=True)
    return out
