"""A slow disk does not slow the training loop: saves run on trainkit's checkpoint thread, the loop only hands them
over. When saves take longer than `checkpoint.every` steps, at most one waits behind the one being written (said
once), and a kill during a slow save still resumes bit-exact.

The disk is made slow at the OS level: an LD_PRELOAD shim (slow_writes.c, built here with gcc) sleeps in every
write, pwrite, writev and fsync to a file under `W/checkpoints`, in whichever thread (Python, Orbax, tensorstore)
makes it. Times are asserted relative to the same machine's step time in the same test, never in absolute terms.
"""

from __future__ import annotations

import json
import re
import signal
import statistics
import time
from pathlib import Path

import pytest
from checks import assert_only_complete_steps, assert_same_state, build_shim, start_training
from conftest import cli_env, train

pytestmark = [pytest.mark.fault, pytest.mark.slow]

SAVED = re.compile(r"trainkit: saved step (\d+): .* in ([\d.]+) s .*train loop blocked ([\d.]+) ms")
WAITS = "waits for step"


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"), "slow_writes.c")


def slow_env(shim: Path, workdir: Path, ms: int) -> dict[str, str]:
    return {"LD_PRELOAD": str(shim), "SLOW_PREFIX": str(workdir / "checkpoints"), "SLOW_WRITE_MS": str(ms)}


def saves(stdout: str) -> list[tuple[int, float, float]]:
    """(step, seconds the save took on the checkpoint thread, ms the loop was blocked) per logged save."""
    return [(int(m[1]), float(m[2]), float(m[3])) for m in SAVED.finditer(stdout)]


def window_rates(workdir: Path) -> dict[int, float]:
    """steps/s of each logged window of train steps, by the window's last step (the first, compiling, left out)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    rates = {row["step"]: row["steps_per_sec"] for row in rows if "steps_per_sec" in row}
    return {step: rate for step, rate in rates.items() if step != min(rates)}


CNN = ("--config.num_steps=150", "--config.log_every=10", "--config.eval_every=150", "--config.checkpoint.every=50",
       "--config.export.formats=()")


def test_a_slow_disk_does_not_slow_the_steps_between_saves(shim, tmp_path):
    """The default model; each save takes ~0.5-1 s of sleeping writes, less than the 50 steps between saves."""
    baseline = train(tmp_path / "baseline", *CNN)
    base_rate = statistics.median(window_rates(tmp_path / "baseline").values())
    step_ms = 1e3 / base_rate
    workdir = tmp_path / "slow"
    proc = train(workdir, *CNN, env=cli_env(**slow_env(shim, workdir, 10)))
    logged = saves(proc.stdout)
    assert [s for s, _, _ in logged] == [50, 100, 150], proc.stdout
    assert [s for s, _, _ in saves(baseline.stdout)] == [50, 100, 150]
    for step, seconds, blocked_ms in logged:
        assert seconds * 1e3 > 5 * step_ms, f"step {step}: the disk was not slow ({seconds} s per save)"
        assert blocked_ms < 0.5 * step_ms, f"step {step}: the loop was blocked {blocked_ms} ms by a slow save"
    rates = window_rates(workdir)
    typical = statistics.median(rates.values())
    for step in (60, 110):  # the windows that run while the saves of steps 50 and 100 are being written
        assert rates[step] > 0.5 * typical, f"steps {step - 9}..{step} ran at {rates[step]:.1f} steps/s, " \
                                            f"typically {typical:.1f}: the slow save slowed the loop"
    assert WAITS not in proc.stdout  # each save finished before the next one was handed over
    assert assert_only_complete_steps(workdir / "checkpoints")[-1] == 150


MLP = ("--config.num_steps=120", "--config.batch_size=32", "--config.log_every=10", "--config.eval_every=120",
       "--config.checkpoint.every=20", "--config.checkpoint.keep_last=10", "--config.export.formats=()")


def test_saves_slower_than_the_loop_queue_at_most_one_and_say_so_once(shim, tmp_path):
    """A small MLP steps far faster than a save of ~1 s: every save after the first has to queue."""
    workdir = tmp_path / "w"
    proc = train(workdir, *MLP, config="configs/default.py:mlp", env=cli_env(**slow_env(shim, workdir, 20)))
    assert proc.stdout.count(WAITS) == 1, proc.stdout
    assert "at most 1 save waits" in proc.stdout
    logged = saves(proc.stdout)
    assert [s for s, _, _ in logged] == [20, 40, 60, 80, 100, 120], proc.stdout  # all saved, in order
    # With one save being written and one waiting, the third hand-over waits until the first is written: the loop
    # is blocked for about one save then, and never for two (which a deeper queue, or none, would show).
    longest_save_ms = max(1e3 * seconds for _, seconds, _ in logged)
    assert all(blocked < 2 * longest_save_ms for _, _, blocked in logged), logged
    assert assert_only_complete_steps(workdir / "checkpoints") == [20, 40, 60, 80, 100, 120]


def test_a_kill_during_a_slow_save_resumes_bit_exact(shim, tmp_path):
    reference = tmp_path / "reference"
    train(reference, *MLP, config="configs/default.py:mlp")
    workdir, log = tmp_path / "w", tmp_path / "log"
    proc = start_training(workdir, *MLP, log=log, config="configs/default.py:mlp", **slow_env(shim, workdir, 40))
    deadline = time.monotonic() + 300
    while "saved step 20:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # step 40's save is being written (slowly) now
    assert proc.poll() is None, log.read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = assert_only_complete_steps(workdir / "checkpoints")
    assert steps == [20], (steps, log.read_text())
    resumed = train(workdir, *MLP, config="configs/default.py:mlp")
    assert "at step 20" in resumed.stdout, resumed.stdout
    for step in (40, 120):
        assert_same_state(workdir, reference, step)
