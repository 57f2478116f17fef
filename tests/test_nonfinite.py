"""The non-finite guard: a diverging run stops at its first non-finite step in one line naming the last good
checkpoint; nothing non-finite is ever saved, nor becomes `last` or `best`; a sane learning rate resumes; with
`on_nonfinite=skip` the run trains to the end and counts the skipped steps."""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_user_error, train

from trainkit.checkpoints.layout import list_steps, read_alias, step_dir_name
from trainkit.checkpoints.manager import read_state_arrays
from trainkit.logging.metrics import read_metrics

RUN = ("--config.log_every=5", "--config.eval_every=10", "--config.checkpoint.every=10",
       "--config.checkpoint.keep_last=100", "--config.export.formats=()")


def state_leaves(workdir: Path, step: int) -> list[np.ndarray]:
    return jax.tree.leaves(read_state_arrays(workdir / "checkpoints" / step_dir_name(step)))


def assert_all_finite(workdir: Path, step: int) -> None:
    for leaf in state_leaves(workdir, step):
        if np.issubdtype(leaf.dtype, np.inexact):
            assert np.isfinite(leaf).all(), f"step {step} holds non-finite values"


def stopped_at(line: str) -> int:
    return int(re.search(r"error: step (\d+): ", line).group(1))


def test_huge_learning_rate_stops_at_first_nonfinite_step(tmp_path):
    """lr=1e5 with a save after every step: the run stops at its first non-finite step S; exactly the finite steps
    1 .. S-1 are on disk and `last` is S-1 (finite, if far from a good state: see the next test for resuming)."""
    proc = train(tmp_path, *RUN, "--config.num_steps=20", "--config.learning_rate=1e5",
                 "--config.checkpoint.every=1", check=False)
    line = assert_user_error(proc, "non-finite loss or gradient", "stopped without saving it")
    assert proc.returncode == 2
    stop = stopped_at(line)
    assert f"the last good checkpoint is step {stop - 1} " in line, line
    checkpoints = tmp_path / "checkpoints"
    assert list_steps(checkpoints) == list(range(1, stop))
    assert read_alias(checkpoints, "last") == stop - 1
    for step in list_steps(checkpoints):
        assert_all_finite(tmp_path, step)


@pytest.mark.slow
def test_nan_mid_run_is_never_saved_and_a_sane_learning_rate_resumes(tmp_path):
    """20 good steps, then lr=nan with a save due after every step: step 21 is not finite, so neither it nor any
    later step is saved; `last` stays 20 and `best` a finite step; the sane learning rate resumes from 20."""
    train(tmp_path, *RUN, "--config.num_steps=20")
    proc = train(tmp_path, *RUN, "--config.num_steps=40", "--config.learning_rate=nan",
                 "--config.checkpoint.every=1", check=False)
    line = assert_user_error(proc, "step 21: ", "non-finite", "the last good checkpoint is step 20 ")
    checkpoints = tmp_path / "checkpoints"
    assert list_steps(checkpoints) == [10, 20]
    assert read_alias(checkpoints, "last") == 20 and read_alias(checkpoints, "best") in (10, 20), line
    assert all(np.isfinite(v) for r in read_metrics(tmp_path) for v in r.values() if isinstance(v, float))

    proc = train(tmp_path, *RUN, "--config.num_steps=40")
    assert "at step 20" in proc.stdout, proc.stdout
    assert list_steps(checkpoints)[-1] == 40 and read_alias(checkpoints, "final") == 40
    for alias in ("last", "best", "final"):
        assert_all_finite(tmp_path, read_alias(checkpoints, alias))


def test_nan_learning_rate_stops_at_step_1_before_any_save(tmp_path):
    """lr=nan: step 1's loss and gradient are finite, its update is not: the run stops at step 1 (the save that
    `checkpoint.every=1` asks for included) and leaves no checkpoint."""
    proc = train(tmp_path, *RUN, "--config.num_steps=20", "--config.learning_rate=nan",
                 "--config.checkpoint.every=1", check=False)
    line = assert_user_error(proc, "step 1: the loss and gradient norm were finite but the update made",
                             "no checkpoint was saved yet")
    assert stopped_at(line) == 1
    assert list_steps(tmp_path / "checkpoints") == []


def test_skip_mode_trains_to_the_end_and_counts_skipped_steps(tmp_path):
    """on_nonfinite=skip with lr=nan: every update is dropped, every step still counts; the saved states are the
    initial params (finite) at steps 10 and 20, and metrics.jsonl counts the 20 skipped steps."""
    proc = train(tmp_path, *RUN, "--config.num_steps=20", "--config.learning_rate=nan",
                 "--config.on_nonfinite=skip")
    assert "trainkit: skipped 20 non-finite steps" in proc.stdout, proc.stdout
    records = [r for r in read_metrics(tmp_path) if "train/skipped_steps" in r]
    assert [(r["step"], r["train/skipped_steps"]) for r in records] == [(5, 5), (10, 5), (15, 5), (20, 5)]
    checkpoints = tmp_path / "checkpoints"
    assert list_steps(checkpoints) == [10, 20] and read_alias(checkpoints, "final") == 20
    for a, b in zip(state_leaves(tmp_path, 10), state_leaves(tmp_path, 20)):
        if a.shape != ():  # the step counter differs; params, optimizer state and rng do not
            assert np.array_equal(a, b)
    assert_all_finite(tmp_path, 20)


def test_unknown_mode_is_one_line(tmp_path):
    proc = train(tmp_path, "--config.on_nonfinite=ignore", check=False)
    assert_user_error(proc, "on_nonfinite='ignore' must be 'stop' or 'skip'")
