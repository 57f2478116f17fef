"""Resume as a specification: bit-exact continuation, kills, SIGTERM, damaged steps, other device counts,
and the one-line errors that leave existing checkpoints untouched."""

from __future__ import annotations

import fcntl
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_user_error, cli_env, train, tree_hash

from trainkit.checkpoints.layout import list_steps, read_alias, step_dir_name
from trainkit.checkpoints.manager import read_state_arrays
from trainkit.logging.metrics import read_metrics

RUN = ("--config.num_steps=40", "--config.log_every=2", "--config.eval_every=10", "--config.checkpoint.every=10",
       "--config.checkpoint.keep_last=10")


def params_at(workdir: Path, step: int | None = None) -> dict:
    ckpts = workdir / "checkpoints"
    step = read_alias(ckpts, "final") if step is None else step
    return read_state_arrays(ckpts / step_dir_name(step))


def assert_bit_equal(a: dict, b: dict) -> None:
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), "not bit-identical"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 40-step run that keeps every checkpoint (every 10 steps)."""
    workdir = tmp_path_factory.mktemp("reference")
    train(workdir, *RUN)
    return workdir


def start(workdir: Path, *args: str, devices: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainkit.main", "--config=configs/default.py", f"--workdir={workdir}", *RUN, *args],
        cwd=ROOT, env=cli_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for_step(workdir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step for r in read_metrics(workdir)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


def test_resume_is_bit_exact(reference, tmp_path):
    """Train 40 == train 20, stop, resume from that checkpoint, train 20 more: identical bits."""
    train(tmp_path, *RUN, f"--resume_from={reference}/checkpoints/000020")
    assert_bit_equal(params_at(tmp_path), params_at(reference))
    steps = [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert steps[0] == 22 and steps[-1] == 40, steps


def test_finished_run_says_so_and_continues_when_asked(reference, tmp_path):
    import shutil

    shutil.copytree(reference, tmp_path / "w")
    proc = train(tmp_path / "w", *RUN)
    assert "already trained to step 40" in proc.stdout
    proc = train(tmp_path / "w", *RUN, "--config.num_steps=44")
    assert "start: workdir" in proc.stdout and "at step 40" in proc.stdout
    assert read_alias(tmp_path / "w" / "checkpoints", "final") == 44


def test_sigterm_saves_current_step_and_resume_is_exact(reference, tmp_path):
    proc = start(tmp_path)
    wait_for_step(tmp_path, 14, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = read_alias(tmp_path / "checkpoints", "last")
    assert stopped is not None, out
    # The step it was at when the signal came (step 14 was logged first), not the regular save at step 10.
    assert 14 <= stopped < 40, stopped
    assert f"trainkit: SIGTERM: saved step {stopped} to " in out, out
    assert read_alias(tmp_path / "checkpoints", "final") is None
    train(tmp_path, *RUN)
    assert_bit_equal(params_at(tmp_path), params_at(reference))


@pytest.mark.slow
def test_kill_9_at_random_moments(tmp_path):
    """Six SIGKILLs (the first during a save), resuming each time; the final state equals an uninterrupted run's."""
    longer = ("--config.num_steps=150",)
    train(tmp_path / "reference", *RUN, *longer)
    workdir = tmp_path / "killed"
    rng = random.Random(1234)
    killed_during_save = False
    for kill in range(6):
        proc = start(workdir, *longer)
        if kill == 0:  # wait for a save to be in flight, then kill it
            deadline = time.time() + 120
            while time.time() < deadline and proc.poll() is None:
                if any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").glob("*")):
                    proc.kill()
                    killed_during_save = True
                    break
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(3.0, 9.0))
            proc.kill()
        proc.wait()
        for step in list_steps(workdir / "checkpoints"):  # no partial step is ever listed
            assert (workdir / "checkpoints" / step_dir_name(step) / "_CHECKPOINT_METADATA").exists()
    assert killed_during_save
    train(workdir, *RUN, *longer)
    assert_bit_equal(params_at(workdir), params_at(tmp_path / "reference"))


def test_damaged_latest_step_is_skipped(reference, tmp_path):
    import shutil

    shutil.copytree(reference, tmp_path / "w")
    latest = tmp_path / "w" / "checkpoints" / "000040"
    victim = max((p for p in (latest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    verify = subprocess.run([sys.executable, "-m", "trainkit.ckpt", "verify", str(latest)], cwd=ROOT,
                            env=cli_env(), capture_output=True, text=True)
    assert verify.returncode == 1 and victim.name in verify.stderr
    proc = train(tmp_path / "w", *RUN, "--config.num_steps=44")
    assert "skipping damaged checkpoint" in proc.stdout
    assert "at step 30" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 1])
def test_resume_onto_other_device_count(tmp_path, devices):
    """Saved on 8 devices (data=4, fsdp=2), resumed on 2 and on 1 with the same global batch."""
    mesh8 = ("--config.mesh.data=4", "--config.mesh.fsdp=2")
    ref = tmp_path / "ref8"
    train(ref, *RUN, "--config.num_steps=20", *mesh8, devices=8)
    train(tmp_path / "w", *RUN, "--config.num_steps=20", f"--resume_from={ref}/checkpoints/000010",
          "--config.mesh.data=-1", "--config.mesh.fsdp=1", devices=devices)
    a, b = params_at(tmp_path / "w")["params"], params_at(ref)["params"]
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


# -- bad inputs: one line, non-zero exit, nothing on disk lost ---------------------------------------------

@pytest.fixture
def trained(reference, tmp_path) -> Path:
    import shutil

    shutil.copytree(reference, tmp_path / "trained")
    return tmp_path / "trained"


def test_resume_from_missing_source(trained):
    before = tree_hash(trained)
    proc = train(trained, *RUN, "--resume_from=/nonexistent/ckpt", check=False)
    assert_user_error(proc, "/nonexistent/ckpt", "does not exist")
    assert tree_hash(trained) == before


def test_resume_from_directory_that_is_not_a_checkpoint(trained, tmp_path):
    (tmp_path / "empty").mkdir()
    before = tree_hash(trained)
    assert_user_error(train(trained, *RUN, f"--resume_from={tmp_path / 'empty'}", check=False), "not a")
    assert tree_hash(trained) == before


def test_checkpoint_of_another_model(trained, tmp_path):
    before = tree_hash(trained)
    proc = train(tmp_path / "new", *RUN, f"--resume_from={trained}", config="configs/default.py:mlp", check=False)
    assert_user_error(proc, "'cnn'", "'mlp'", "--init_from")
    proc = train(trained, *RUN, "--config.num_steps=50", config="configs/default.py:mlp", check=False)
    assert_user_error(proc, "'cnn'", "'mlp'")
    assert tree_hash(trained) == before


@pytest.mark.slow
def test_structural_change_refused_and_partial_init(trained, tmp_path):
    proc = train(trained, *RUN, "--config.num_steps=50", "--config.model.hidden=64", check=False)
    assert_user_error(proc, "model.hidden")
    proc = train(tmp_path / "ft", *RUN, f"--init_from={trained}", "--config.model.hidden=64", check=False)
    assert_user_error(proc, "--partial")
    proc = train(tmp_path / "ft", *RUN, "--config.num_steps=4", f"--init_from={trained}",
                 "--config.model.hidden=64", "--partial")
    # Conv_0, Conv_1 and the (10,) output bias fit; Dense_0 (kernel, bias) and the output kernel are new
    assert "initialised 5 parameter arrays" in proc.stdout and "3 fresh" in proc.stdout


def test_init_from_fine_tunes_from_step_0(trained, tmp_path):
    proc = train(tmp_path / "ft", "--config.num_steps=4", "--config.log_every=2",
                 f"--init_from={trained}/checkpoints/best")
    assert "start: init_from" in proc.stdout and "at step 0" in proc.stdout
    ft = params_at(tmp_path / "ft", 4)
    assert int(ft["step"]) == 4
    assert int(ft["opt_state"][0][0]["count"]) == 4  # a fresh optimizer


def test_newer_format_version(trained):
    manifest = trained / "checkpoints" / "000040" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    before = tree_hash(trained)
    proc = train(trained, *RUN, f"--resume_from={trained}/checkpoints/000040", check=False)
    assert_user_error(proc, "format version 99", "upgrade trainkit")
    assert tree_hash(trained) == before


def test_locked_workdir(trained):
    before = tree_hash(trained)
    with open(trained / ".trainkit.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("pid 1 on testhost")
        f.flush()
        proc = train(trained, *RUN, check=False)
    assert_user_error(proc, "in use")
    assert tree_hash(trained) == before
    train(trained, *RUN)  # the lock is gone once its holder is: no stale lock


def test_read_only_workdir_with_checkpoints(trained, read_only_dir):
    ro = read_only_dir(trained)
    before = tree_hash(ro)
    assert_user_error(train(ro, *RUN, "--config.num_steps=50", check=False), "not writable")
    assert tree_hash(ro) == before


def test_fresh_refuses_without_overwrite(trained):
    before = tree_hash(trained)
    assert_user_error(train(trained, *RUN, "--fresh", check=False), "--overwrite")
    assert tree_hash(trained) == before


def test_walltime_saves_and_exits_cleanly(tmp_path):
    """--config.walltime: save and exit 0 before the budget ends; the same command continues later."""
    proc = train(tmp_path, "--config.num_steps=100000", "--config.walltime=4", "--config.log_every=5",
                 "--config.eval_every=100000", "--config.checkpoint.every=0", timeout=180)
    stopped = read_alias(tmp_path / "checkpoints", "last")
    assert "walltime: saved step" in proc.stdout and stopped is not None and 0 < stopped < 100000
    assert read_alias(tmp_path / "checkpoints", "final") is None
