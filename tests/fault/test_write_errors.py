"""A disk that stops taking writes mid-run (a failing disk: EIO; a read-only remount: EROFS; a lost permission:
EACCES): one line naming the step, the path and the cause, a non-zero exit, no traceback; the previous step still
verifies, and the same command resumes from it once the disk is writable, bit-exact with an uninterrupted run.

The fault is real at the OS level: an LD_PRELOAD shim (failing_writes.c, built here with gcc) makes every write
under `W/checkpoints/000020` fail with the chosen errno inside the training process (Python, Orbax and tensorstore
alike), the way root's chmod cannot. As root, a real read-only remount of W/checkpoints mid-run is tested too.
ENOSPC has its own tests (test_disk_full.py).
"""

from __future__ import annotations

import errno
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from checks import (assert_only_complete_steps, assert_same_state, build_shim, can_mount, small_disk, start_training,
                    unfinished_saves)
from conftest import assert_user_error, cli_env, run_cli, train

from trainkit.checkpoints.layout import read_alias

pytestmark = [pytest.mark.fault, pytest.mark.slow]

RUN = ("--config.num_steps=40", "--config.batch_size=32", "--config.log_every=10", "--config.eval_every=20",
       "--config.checkpoint.every=10", "--config.checkpoint.keep_last=1", "--config.checkpoint.keep_best=0",
       "--config.export.formats=()")


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"), "failing_writes.c")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same 40 steps on a healthy disk, uninterrupted."""
    workdir = tmp_path_factory.mktemp("reference")
    train(workdir, *RUN)
    return workdir


@pytest.mark.parametrize("code, cause", [(errno.EIO, "input/output error"), (errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_write_error_mid_run_is_one_line_and_the_previous_step_resumes(shim, reference, tmp_path, code, cause):
    workdir = tmp_path / "w"
    failing = cli_env(LD_PRELOAD=str(shim), FAULT_PREFIX=str(workdir / "checkpoints" / "000020"),
                      FAULT_ERRNO=str(code))
    proc = train(workdir, *RUN, env=failing, check=False)
    line = assert_user_error(proc, "saving checkpoint step 20", cause, str(workdir / "checkpoints" / "000020"),
                             "resumes from step 10")
    assert proc.returncode == 2, line
    checkpoints = workdir / "checkpoints"
    assert assert_only_complete_steps(checkpoints) == [10]
    assert read_alias(checkpoints, "last") == 10
    ok = run_cli("verify", str(workdir), module="trainkit.ckpt")
    assert ok.returncode == 0 and "OK" in ok.stdout and "step 10" in ok.stdout, ok.stdout + ok.stderr

    proc = train(workdir, *RUN)  # the disk is writable again: the same command continues
    assert "at step 10" in proc.stdout, proc.stdout
    assert unfinished_saves(checkpoints) == []
    assert_same_state(workdir, reference, 40)


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root")
def test_checkpoints_remounted_read_only_mid_run(tmp_path):
    """A real read-only remount: W/checkpoints is a tmpfs, remounted `ro` while the run trains (the process is
    paused for the remount, which a file open for writing would refuse). The next save fails in one line; the step
    before it verifies; once remounted `rw` the same command resumes from it."""
    workdir, log = tmp_path / "w", tmp_path / "log"
    checkpoints = workdir / "checkpoints"
    checkpoints.mkdir(parents=True)
    run = (*RUN, "--config.num_steps=100", "--config.checkpoint.async_save=False")
    with small_disk(checkpoints, "64m"):
        proc = start_training(workdir, *run, log=log)
        deadline = time.monotonic() + 300
        while "trainkit: saved step 10:" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        for _ in range(100):  # between saves nothing under checkpoints/ is open; retry if a save just began
            proc.send_signal(signal.SIGSTOP)
            remounted = subprocess.run(["mount", "-o", "remount,ro", str(checkpoints)]).returncode == 0
            proc.send_signal(signal.SIGCONT)
            if remounted:
                break
            time.sleep(0.05)
        assert remounted
        assert proc.wait(timeout=300) == 2
        out = log.read_text()
        assert "Traceback" not in out, out
        [line] = [x for x in out.splitlines() if x.startswith("trainkit: error:")]
        failed = int(re.search(r"saving checkpoint step (\d+) ", line).group(1))
        assert "read-only file system" in line and f"resumes from step {failed - 10}," in line, line
        assert assert_only_complete_steps(checkpoints) == [failed - 10]
        assert run_cli("verify", str(workdir), module="trainkit.ckpt").returncode == 0

        subprocess.run(["mount", "-o", "remount,rw", str(checkpoints)], check=True)
        proc = train(workdir, *run)
        assert f"at step {failed - 10}" in proc.stdout, proc.stdout
        assert assert_only_complete_steps(checkpoints) == [100]
