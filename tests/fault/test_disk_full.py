"""A full disk during a save: one line naming the cause and the fix, a non-zero exit, no traceback; the previous
good checkpoint intact and resumable once there is space again; no half-written step ever listed.

The disk is a real tmpfs mounted small (root, as on CI). Where mounting is not allowed, only the injected case
runs: the manifest write raising ENOSPC, patched in at the Python file layer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from checks import (assert_only_complete_steps, assert_same_state, can_mount, dir_bytes, fill, resize, small_disk,
                    unfinished_saves)
from conftest import ROOT, assert_user_error, cli_env, run_cli, train, tree_hash

from trainkit.checkpoints.layout import list_steps, read_alias
from trainkit.logging.metrics import read_metrics

pytestmark = pytest.mark.fault

RUN = ("--config.num_steps=40", "--config.batch_size=32", "--config.log_every=10", "--config.eval_every=20",
       "--config.checkpoint.every=10", "--config.checkpoint.keep_last=1", "--config.checkpoint.keep_best=0",
       "--config.export.formats=()")
needs_mount = pytest.mark.skipif(not can_mount(), reason="mounting a small tmpfs needs root")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same 40 steps on a roomy disk, uninterrupted."""
    workdir = tmp_path_factory.mktemp("reference")
    train(workdir, *RUN)
    return workdir


def verify(source) -> subprocess.CompletedProcess:
    return run_cli("verify", str(source), module="trainkit.ckpt")


@needs_mount
def test_async_save_on_a_disk_that_fills_up(reference, tmp_path):
    """The disk holds one checkpoint but not two: step 10 is saved, step 20 fails in Orbax's background thread."""
    step_bytes = dir_bytes(reference / "checkpoints" / "000040")
    with small_disk(tmp_path / "disk", f"{int(step_bytes * 1.6) // 1024}k") as disk:
        workdir = disk / "w"
        proc = train(workdir, *RUN, check=False)
        line = assert_user_error(proc, "saving checkpoint step 20", "no space left on device", "free space",
                                 "resumes from step 10")
        assert proc.returncode == 2, line
        assert assert_only_complete_steps(workdir / "checkpoints") == [10]
        assert read_alias(workdir / "checkpoints", "last") == 10
        ok = verify(workdir)
        assert ok.returncode == 0 and "OK" in ok.stdout and "step 10" in ok.stdout, ok.stderr

        resize(disk, f"{int(step_bytes * 4) // 1024}k")  # space is freed: the same command continues
        proc = train(workdir, *RUN)
        assert "start: workdir" in proc.stdout and "at step 10" in proc.stdout, proc.stdout
        assert unfinished_saves(workdir / "checkpoints") == []
        assert_same_state(workdir, reference, 40)


@needs_mount
def test_sync_save_after_someone_else_filled_the_disk(tmp_path):
    """A good checkpoint at step 20, then a ballast file leaves 200 kB: the synchronous save of step 30 fails;
    exporting or packing onto that disk fails the same way, leaving no partial file."""
    sync = (*RUN, "--config.checkpoint.async_save=False")
    with small_disk(tmp_path / "disk", "16m") as disk:
        workdir = disk / "w"
        train(workdir, *sync, "--config.num_steps=20")
        ballast = fill(disk, leave_bytes=200_000)
        proc = train(workdir, *sync, check=False)
        assert_user_error(proc, "saving checkpoint step 30", "no space left on device", "resumes from step 20")
        assert assert_only_complete_steps(workdir / "checkpoints") == [20]
        assert verify(workdir).returncode == 0
        before = tree_hash(workdir / "checkpoints")

        for module, args in (("trainkit.ckpt", ("pack", str(workdir), "-o", str(disk / "model.ckpt"))),
                             ("trainkit.export", (str(workdir), "-o", str(disk / "model.safetensors")))):
            proc = run_cli(*args, module=module)
            assert_user_error(proc, "no space left on device", "free disk space")
            assert sorted(p.name for p in disk.iterdir()) == ["ballast", "w"], "a partial file was left behind"
        assert tree_hash(workdir / "checkpoints") == before

        ballast.unlink()
        proc = train(workdir, *sync)  # (not compared with `reference`: a 20-step run's schedule is another one)
        assert "at step 20" in proc.stdout and list_steps(workdir / "checkpoints") == [40]
        assert unfinished_saves(workdir / "checkpoints") == [] and verify(workdir).returncode == 0


# Runs trainkit.main with the manifest write failing once with ENOSPC (the Orbax save itself succeeded).
INJECT_ENOSPC_IN_MANIFEST = """
import errno, os, sys
import trainkit.checkpoints.manager as checkpointing
real, calls = checkpointing.write_manifest, []
def write_manifest(step_dir, **kw):
    calls.append(step_dir)
    if len(calls) == int(os.environ["FAIL_CALL"]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(step_dir) + "/manifest.json")
    return real(step_dir, **kw)
checkpointing.write_manifest = write_manifest
from trainkit.main import run
sys.argv[0] = "trainkit.main"
run()
"""


def test_manifest_write_on_a_full_disk(reference, tmp_path):
    """Works without root: ENOSPC injected into the manifest write of step 20. The step itself is complete (Orbax
    committed it), so it is kept and the next start finishes its manifest and resumes from it."""
    workdir = tmp_path / "w"
    proc = subprocess.run([sys.executable, "-c", INJECT_ENOSPC_IN_MANIFEST, "--config=configs/default.py",
                           f"--workdir={workdir}", *RUN, "--config.checkpoint.keep_last=2"], cwd=ROOT,
                          env=cli_env(FAIL_CALL="2"), capture_output=True, text=True, timeout=300)
    assert_user_error(proc, "saving checkpoint step 20", "no space left on device", "resumes from step 20")
    assert assert_only_complete_steps(workdir / "checkpoints") == [10, 20]
    assert not (workdir / "checkpoints" / "000020" / "manifest.json").exists()
    assert verify(workdir / "checkpoints" / "000010").returncode == 0
    proc = train(workdir, *RUN)
    assert "at step 20" in proc.stdout and "skipping damaged" not in proc.stdout, proc.stdout
    assert_same_state(workdir, reference, 40)


def test_a_metrics_line_torn_by_the_full_disk_does_not_block_the_resume(reference, tmp_path):
    """A write cut short by ENOSPC can leave half a line at the end of metrics.jsonl; the resume drops it."""
    workdir = tmp_path / "w"
    shutil.copytree(reference, workdir)
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "train/lo')
    proc = train(workdir, *RUN, "--config.num_steps=50")
    assert "at step 40" in proc.stdout
    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50]
