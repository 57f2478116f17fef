"""Multi-process training as a specification: real processes on 127.0.0.1 with CPU (gloo) collectives, started
through `python -m trainkit.launch` the way a user would, and real SIGTERM / SIGKILL to one of them.

Every run shares one global batch and mesh layout (data x fsdp = 8-way or 4-way over the same batch), so a run
of 2 processes x 4 devices, one of 1 process x 8 devices, and any resume between them compute the same numbers
up to float reduction order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, assert_user_error, cli_env, run_cli, train

from trainkit.checkpoints.layout import list_steps, read_alias, step_dir_name
from trainkit.checkpoints.manager import read_state_arrays
from trainkit.logging.metrics import read_metrics

RUN = ("--config.num_steps=60", "--config.log_every=1", "--config.eval_every=15", "--config.checkpoint.every=15",
       "--config.checkpoint.keep_last=5", "--config.progress=none", "--distributed_timeout=60")
MESH_8 = ("--config.mesh.data=4", "--config.mesh.fsdp=2")  # the same batch split on 8 devices, 1 or 2 processes
MESH_ANY = ("--config.mesh.data=-1", "--config.mesh.fsdp=1")
DEFAULT = "--config=configs/default.py"
LAUNCHER_LINE = re.compile(r"trainkit\.launch: (\d+) processes \(pids ([\d ]+)\)")


def launch_args(workdir: Path, *overrides: str, n: int = 2, devices: int = 4, config: str = DEFAULT,
                launcher: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "trainkit.launch", "-n", str(n), "--devices_per_process", str(devices),
            *launcher, "--", config, f"--workdir={workdir}", *overrides]


def launch(workdir: Path | str, *overrides: str, check: bool = True, timeout: float = 600, env: dict | None = None,
           **kw) -> subprocess.CompletedProcess:
    """Run N processes through the launcher to completion."""
    proc = subprocess.run(launch_args(workdir, *overrides, **kw), cwd=ROOT, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start_launch(workdir: Path, log: Path, *overrides: str, **kw) -> tuple[subprocess.Popen, list[int]]:
    """Start the launcher in the background (output to `log`); return it and its processes' pids."""
    proc = subprocess.Popen(launch_args(workdir, *overrides, **kw), cwd=ROOT, env=cli_env(), text=True,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        match = LAUNCHER_LINE.search(log.read_text())
        if match:
            return proc, [int(p) for p in match.group(2).split()]
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    raise TimeoutError("the launcher did not start its processes")


def wait_until(condition, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text()[-5000:]
        assert time.time() < deadline, f"timed out; output:\n{log.read_text()[-5000:]}"
        time.sleep(0.02)


def final_params(workdir: Path) -> dict:
    ckpts = workdir / "checkpoints"
    return read_state_arrays(ckpts / step_dir_name(read_alias(ckpts, "final")))


def assert_params_close(a: dict, b: dict) -> None:
    import jax

    assert int(a["step"]) == int(b["step"])
    leaves_a, leaves_b = jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def lines(output: str, fragment: str) -> list[str]:
    return [line for line in output.splitlines() if fragment in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """1 process x 8 devices (data=4, fsdp=2): the numbers every multi-process run must reproduce."""
    workdir = tmp_path_factory.mktemp("one_process")
    train(workdir, *RUN, *MESH_8, devices=8)
    return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same run as 2 processes x 4 devices, through the launcher."""
    workdir = tmp_path_factory.mktemp("two_processes")
    return workdir, launch(workdir, *RUN, *MESH_8)


# -- fast: one-line errors before anything trains ----------------------------------------------------------

def test_launcher_sets_the_process_flags_itself(tmp_path):
    proc = run_cli("-n", "2", "--", DEFAULT, f"--workdir={tmp_path}", "--process_id=1", module="trainkit.launch")
    assert_user_error(proc, "--process_id", "set by the launcher")


def test_unreachable_coordinator_is_one_line(tmp_path):
    import socket

    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.time()
    proc = train(tmp_path, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
                 "--distributed_timeout=3", check=False, timeout=120)
    assert_user_error(proc, f"127.0.0.1:{port}", "unreachable", "3 s", "--distributed_timeout")
    assert time.time() - started < 60


def test_incomplete_process_flags(tmp_path):
    proc = train(tmp_path, "--coordinator_address=127.0.0.1:1234", check=False)
    assert_user_error(proc, "--num_processes", "--process_id")


# -- multi-process training ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_train_like_one(reference, two_processes):
    """Same losses at every step as 1 process x 8 devices; process 0 alone writes metrics, progress and exports."""
    workdir, proc = two_processes
    ref = {r["step"]: r for r in read_metrics(reference) if "train/loss" in r}
    got = {r["step"]: r for r in read_metrics(workdir) if "train/loss" in r}
    assert sorted(got) == sorted(ref) == list(range(1, 61))
    for step in ref:
        np.testing.assert_allclose(got[step]["train/loss"], ref[step]["train/loss"], rtol=1e-5, err_msg=f"{step}")
    evals = lambda w: [r["eval/loss"] for r in read_metrics(w) if "eval/loss" in r]  # noqa: E731
    np.testing.assert_allclose(evals(workdir), evals(reference), rtol=1e-5)
    assert len(evals(workdir)) == 4  # steps 15, 30, 45, 60: eval batches split over the processes, padding masked
    assert_params_close(final_params(workdir), final_params(reference))
    out = proc.stdout
    assert len(lines(out, "start: scratch")) == 1 and lines(out, "start: scratch")[0].startswith("[0] ")
    assert "(8 devices)" in out
    assert lines(out, "exported") and all(line.startswith("[0] ") for line in lines(out, "exported"))
    assert lines(out, "[1] trainkit: done at step 60")
    assert (workdir / "export" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.slow  # ~40 s
def test_two_processes_on_a_gs_workdir(reference, tmp_path):
    """The TPU pod shape (docs/multihost.md): a gs:// workdir, every process writing its own shards straight to
    the bucket, process 0 the metadata, metrics and exports. Against a GCS JSON-API server on 127.0.0.1."""
    from gcs_emulator import GCSEmulator
    from safetensors.numpy import load as load_safetensors

    with GCSEmulator(buckets=("pod-bucket",)) as gcs:
        launch("gs://pod-bucket/run", *RUN, *MESH_8, env=cli_env(**gcs.env, TRAINKIT_CACHE=str(tmp_path / "cache")))
        ours = load_safetensors(gcs.read("pod-bucket", "run/export/model.safetensors"))
        final = gcs.read("pod-bucket", "run/checkpoints/final").decode().strip()
        step_files = gcs.names("pod-bucket", "run/checkpoints/000060/")
        metrics = gcs.read("pod-bucket", "run/metrics.jsonl").decode().splitlines()
    theirs = load_safetensors((reference / "export" / "model.safetensors").read_bytes())
    assert final == "000060" and ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-5)
    assert {int(json.loads(line)["step"]) for line in metrics} == set(range(1, 61))  # process 0 wrote them once
    assert len(metrics) == len((reference / "metrics.jsonl").read_text().splitlines())
    writers = {f.split("ocdbt.process_")[1].split("/")[0] for f in step_files if "ocdbt.process_" in f}
    assert writers == {"0", "1"}, step_files  # both processes wrote their shards


@pytest.mark.slow
def test_saved_by_two_processes_resumed_by_one(reference, two_processes, tmp_path):
    """2 processes x 4 devices save; 1 process x 2 devices resumes (resharded) and ends where the reference ends."""
    workdir, _ = two_processes
    proc = train(tmp_path, *RUN, *MESH_ANY, f"--resume_from={workdir}/checkpoints/000015", devices=2)
    assert "start: resume_from" in proc.stdout and "at step 15" in proc.stdout
    assert_params_close(final_params(tmp_path), final_params(reference))


@pytest.mark.slow
def test_saved_by_one_process_resumed_by_two_then_sigterm_to_one(reference, tmp_path):
    """1 process x 8 devices saved step 15; 2 processes x 2 devices resume it. A SIGTERM to process 1 alone makes
    both save the same step and exit 0; the relaunch continues from it and ends where the reference ends."""
    log = tmp_path / "launch.log"
    args = (*RUN, *MESH_ANY, f"--resume_from={reference}/checkpoints/000015")
    proc, pids = start_launch(tmp_path, log, *args, devices=2)
    wait_until(lambda: any(r.get("step", 0) >= 17 for r in read_metrics(tmp_path)), proc, log)
    os.kill(pids[1], signal.SIGTERM)
    assert proc.wait(timeout=180) == 0, log.read_text()[-5000:]
    out = log.read_text()
    assert "start: resume_from" in out and "(4 devices)" in out
    saved = {line[:3]: int(re.search(r"saved step (\d+) to", line).group(1)) for line in lines(out, "SIGTERM: saved")}
    assert set(saved) == {"[0]", "[1]"} and len(set(saved.values())) == 1, out[-3000:]
    stopped = saved["[0]"]
    assert stopped % 10 == 0 and 20 <= stopped < 60  # a stop vote (every 10 steps) after the signal
    ckpts = tmp_path / "checkpoints"
    assert read_alias(ckpts, "last") == stopped and read_alias(ckpts, "final") is None

    relaunched = launch(tmp_path, *RUN, *MESH_ANY, devices=2)
    assert "start: workdir" in relaunched.stdout and f"at step {stopped}" in relaunched.stdout
    assert_params_close(final_params(tmp_path), final_params(reference))


@pytest.mark.slow
def test_sigkill_to_one_process_stops_the_run_and_relaunch_resumes(tmp_path):
    """A process killed outright: the launcher stops the other within its grace period and exits non-zero with one
    line naming the process; the relaunch resumes from the last good step and completes."""
    log = tmp_path / "launch.log"
    args = ("--config.num_steps=150", "--config.log_every=10", "--config.eval_every=100",
            "--config.checkpoint.every=15", "--config.progress=none", "--distributed_timeout=20",
            "--config.export.formats=()", *MESH_ANY)
    mlp = "--config=configs/default.py:mlp"
    proc, pids = start_launch(tmp_path, log, *args, devices=2, config=mlp, launcher=("--grace_period", "5"))
    wait_until(lambda: read_alias(tmp_path / "checkpoints", "last") is not None, proc, log)
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.time()
    code = proc.wait(timeout=120)
    assert code != 0 and time.time() - killed_at < 20 + 5, log.read_text()[-5000:]
    errors = lines(log.read_text(), "trainkit: error:")
    assert errors and errors[-1].startswith("trainkit: error: process 1 of 2 was killed by SIGKILL"), errors
    last_good = max(list_steps(tmp_path / "checkpoints"))
    assert last_good < 150

    relaunched = launch(tmp_path, *args, devices=2, config=mlp)
    assert "start: workdir" in relaunched.stdout and f"at step {last_good}" in relaunched.stdout
    assert read_alias(tmp_path / "checkpoints", "final") == 150
