"""Run `trainkit.train.train_and_evaluate` in this process with timing hooks, and a bare loop's matching clock.

The hooks wrap two of the loop's collaborators, not the loop: the metrics writer (the loop writes train metrics
right after pulling them to the host, i.e. at a device sync) marks the window's clocks, and the checkpoint
manager times every `save()` call as the loop sees it (including any wait for the previous save).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
import tempfile
import time

import harness


class SyncWindow:
    """Wall and process-CPU clocks at two synced steps (`first` and `last`), for steps/s over (first, last]."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.marks = first, last, {}

    def mark(self, step: int) -> None:
        if step in (self.first, self.last) and step not in self.marks:
            self.marks[step] = (time.perf_counter(), time.process_time())

    @property
    def wall_s(self) -> float:
        return self.marks[self.last][0] - self.marks[self.first][0]

    def rates(self) -> tuple[float, float]:
        """(steps per wall second, steps per CPU second of this process, all threads)."""
        (w0, c0), (w1, c1) = self.marks[self.first], self.marks[self.last]
        steps = self.last - self.first
        return steps / (w1 - w0), steps / (c1 - c0)


@dataclasses.dataclass
class TrainkitRun:
    window: SyncWindow
    save_calls: list[tuple[int, float]]  # (step, seconds the loop spent in CheckpointManager.save)
    saves: list[dict[str, float]]  # CheckpointManager.saves records: step, bytes, seconds, blocked_s


def train(config, first: int) -> TrainkitRun:
    """`train_and_evaluate(config)` in a temporary workdir (removed after), timing steps (first, num_steps]."""
    from trainkit import train as train_lib
    from trainkit.checkpoints.manager import CheckpointManager
    from trainkit.logging.metrics import MetricsWriter

    window = SyncWindow(first, config.num_steps)
    save_calls: list[tuple[int, float]] = []
    managers: list[CheckpointManager] = []

    class TimedWriter(MetricsWriter):
        def write(self, step, metrics):
            if any(k.startswith("train/") for k in metrics):
                window.mark(step)
            super().write(step, metrics)

    class TimedCheckpoints(CheckpointManager):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            managers.append(self)

        def save(self, step, *args, **kwargs):
            start = time.perf_counter()
            super().save(step, *args, **kwargs)
            save_calls.append((step, time.perf_counter() - start))

    workdir = tempfile.mkdtemp(prefix="bench-train-", dir=harness.scratch_dir())
    train_lib.MetricsWriter, train_lib.CheckpointManager = TimedWriter, TimedCheckpoints
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train_lib.train_and_evaluate(config, workdir)
    finally:
        train_lib.MetricsWriter, train_lib.CheckpointManager = MetricsWriter, CheckpointManager
        shutil.rmtree(workdir, ignore_errors=True)
    return TrainkitRun(window, save_calls, list(managers[0].saves) if managers else [])
