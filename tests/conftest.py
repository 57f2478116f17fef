"""Shared test setup: 8 fake CPU devices in-process, and a helper that runs the real CLI in a subprocess."""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Before anything imports jax: tests see 8 CPU devices, as a small multi-device host would.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent JAX compilation cache per test session, shared by this process and every CLI subprocess: the
# suite starts hundreds of training processes that compile the same few programs (see CONTRIBUTING.md for the
# time it saves). Per session, so a stale cache can never hide a change. TRAINKIT_TEST_JAX_CACHE=0 turns it off.
if os.environ.get("TRAINKIT_TEST_JAX_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="trainkit-test-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # CPU programs compile in well under 1 s
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
elif "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # off means off: not trainkit's own default cache either
    os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cli_env(devices: int = 1, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "HF_"))}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        TRAINKIT_CACHE=env.get("TRAINKIT_CACHE", "/tmp/trainkit-test-cache"),
    )
    env.update(extra)
    return env


def run_cli(*args: str, devices: int = 1, timeout: float = 600, env: dict | None = None,
            module: str = "trainkit.main") -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` the way a user would; returns the finished process."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT, env=env or cli_env(devices), capture_output=True, text=True, timeout=timeout,
    )


def train(workdir: Path, *overrides: str, config: str = "configs/default.py", devices: int = 1,
          check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Train through the CLI; with `check`, fail the test with the process's output if it failed."""
    proc = run_cli(f"--config={config}", f"--workdir={workdir}", *overrides, devices=devices, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """A user error: non-zero exit, one stderr line naming the cause, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("trainkit: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree_hash(path: Path) -> str:
    """A hash of every file's name and bytes under `path` (to prove nothing on disk changed)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.name != ".trainkit.lock":
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


FAST = ("--config.num_steps=20", "--config.log_every=5", "--config.eval_every=10", "--config.checkpoint.every=10")


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write to, root included: a read-only tmpfs where mounting is allowed (root),
    else a chmod 0500 directory (non-root). Yields a callable that fills it first, then seals it."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = False

    def seal(fill_from: Path | None = None) -> Path:
        nonlocal mounted
        if os.geteuid() == 0:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(target)], check=True)
            mounted = True
            if fill_from is not None:
                shutil.copytree(fill_from, target, dirs_exist_ok=True)
            subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        else:
            if fill_from is not None:
                shutil.copytree(fill_from, target, dirs_exist_ok=True)
            for p in [target, *target.rglob("*")]:
                p.chmod(0o500 if p.is_dir() else 0o400)
        return target

    yield seal
    if mounted:
        subprocess.run(["umount", str(target)], check=False)
    else:
        for p in [target, *target.rglob("*")]:
            p.chmod(0o700)
