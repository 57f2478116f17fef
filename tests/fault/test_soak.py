"""Soak: one 2000-step run of the default config, SIGKILLed 20 times at seeded random moments (during start-up,
between steps, and during saves) and resumed each time, ends bit-identical to the same run left alone.

After every kill: only complete steps are listed, the step a restart resumes from is intact, and the disk holds
no more than the retention policy allows (no step ever set aside as damaged).
"""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import pytest
from checks import (TMP_MARK, assert_only_complete_steps, assert_same_state, dir_bytes, start_training,
                    unfinished_saves)

from trainkit.checkpoints.layout import list_steps, read_alias, step_dir_name
from trainkit.logging.metrics import read_metrics

pytestmark = pytest.mark.fault

NUM_STEPS, EVERY, KEEP_LAST, KEEP_BEST = 2000, 25, 2, 1
RUN = (f"--config.num_steps={NUM_STEPS}", "--config.batch_size=32", "--config.log_every=10",
       "--config.eval_every=200", f"--config.checkpoint.every={EVERY}", f"--config.checkpoint.keep_last={KEEP_LAST}",
       f"--config.checkpoint.keep_best={KEEP_BEST}", "--config.export.formats=()", "--config.progress=log")
KILLS = 20
# Where each kill lands: during start-up (imports, restore), after some steps, or while a save is in flight.
PLAN = ["startup"] * 3 + ["step"] * 11 + ["save"] * 6
SEED = 20240611


def logged_step(log: Path) -> int:
    """The last `step N/...` progress line of this run's own log (0 before the first)."""
    steps = re.findall(rb"^step (\d+)/", log.read_bytes(), flags=re.M)
    return int(steps[-1]) if steps else 0


def started(log: Path) -> bool:
    """The run printed its start line: the checkpoint manager is open and stale tmp dirs are gone."""
    return b"trainkit: cnn on" in log.read_bytes()


def wait_until(condition, proc, timeout: float = 120, poll: float = 0.002) -> bool:
    """Poll `condition()`; False if the process ended first (it finished the run)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError(f"condition not met in {timeout} s")


def saves_in_flight(checkpoints: Path) -> list[str]:
    try:
        return [p.name for p in checkpoints.iterdir() if TMP_MARK in p.name]
    except FileNotFoundError:
        return []


def test_twenty_kills_end_bit_identical_to_an_uninterrupted_run(tmp_path):
    reference, workdir, logs = tmp_path / "reference", tmp_path / "killed", tmp_path / "logs"
    logs.mkdir()
    uninterrupted = start_training(reference, *RUN, log=logs / "reference.log")  # runs alongside the kills

    rng = random.Random(SEED)
    plan = PLAN[:]
    rng.shuffle(plan)
    checkpoints = workdir / "checkpoints"
    step_bytes = 0
    done: list[str] = []
    for i, kind in enumerate(plan):
        log = logs / f"run{i:02d}.log"
        log.touch()
        resumed = (list_steps(checkpoints) or [0])[-1]
        proc = start_training(workdir, *RUN, log=log)
        if kind == "startup":
            time.sleep(rng.uniform(0.5, 4.0))
            alive = proc.poll() is None
        elif kind == "step":
            target = min(resumed + rng.randint(40, 200), NUM_STEPS - 20)
            alive = wait_until(lambda: logged_step(log) >= target, proc)
            time.sleep(rng.uniform(0, 0.2))
        else:  # the k-th save of this run, caught while Orbax writes it (a tmp dir), killed at once or a bit later
            nth, seen = rng.randint(1, 3), set()

            def save_started() -> bool:
                if started(log):
                    seen.update(saves_in_flight(checkpoints))
                return len(seen) >= nth and bool(saves_in_flight(checkpoints))

            alive = wait_until(save_started, proc, poll=0.0005)
            time.sleep(rng.choice([0, 0, rng.uniform(0, 0.05)]))
        assert alive, f"run {i} ended before its kill ({kind}):\n{log.read_text()[-3000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        in_flight = [p.name for p in unfinished_saves(checkpoints)]
        done.append(f"{kind}@{logged_step(log)}" + (f"[{','.join(in_flight)}]" if in_flight else ""))

        steps = assert_only_complete_steps(checkpoints)
        assert len(steps) <= KEEP_LAST + KEEP_BEST + 1, (steps, done)
        assert len(in_flight) <= 1, in_flight
        step_bytes = max([step_bytes] + [dir_bytes(checkpoints / step_dir_name(s)) for s in steps])
        allowed = (KEEP_LAST + KEEP_BEST + 2) * step_bytes + 256 * 1024  # + one save in flight, + aliases
        assert dir_bytes(checkpoints) <= allowed, (dir_bytes(checkpoints), allowed, done)
        assert not Path(f"{checkpoints}.damaged").exists(), f"a kill damaged a step: {done}"

    assert sum(k.startswith("save") and "[" in k for k in done) >= 3, f"too few kills during a save: {done}"
    last = logs / "final.log"
    proc = start_training(workdir, *RUN, log=last)
    assert proc.wait(timeout=600) == 0, last.read_text()[-3000:]
    assert uninterrupted.wait(timeout=600) == 0, (logs / "reference.log").read_text()[-3000:]
    assert b"start: workdir" in last.read_bytes()

    assert read_alias(checkpoints, "final") == NUM_STEPS == read_alias(reference / "checkpoints", "final")
    assert_same_state(workdir, reference, NUM_STEPS)
    assert len(list_steps(checkpoints)) <= KEEP_LAST + KEEP_BEST + 1
    assert unfinished_saves(checkpoints) == [] and not Path(f"{checkpoints}.damaged").exists()
    logged = [r["step"] for r in read_metrics(workdir) if "train/loss" in r]
    assert logged == list(range(10, NUM_STEPS + 1, 10)), "metrics.jsonl lost or repeated a step"
    print("kills:", " ".join(done))
