"""Stop requests: SIGTERM/SIGINT and the walltime budget end the run at a step boundary, after a save.

One process: the loop asks `reason()` before every step and stops at the first step after the signal.

Several processes: a signal may reach only one of them (a preempted host), and each process has its own clock,
so they vote. Every `vote_every` steps all processes publish whether they want to stop and meet at a barrier
(`trainkit.distributed.agree_on_stop`); from the same votes they take the same decision at the same step, save
that step together and exit 0. Between votes `reason()` answers None on every process.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

import jax

from trainkit import distributed

VOTE_EVERY = 10  # steps between stop votes; the loop already waits for device results this often


class StopRequests:
    """Set by signal handlers; the loop polls `reason(save_estimate_s, step)` between steps.

    A second SIGINT restores the default handler's behaviour (an immediate KeyboardInterrupt)."""

    def __init__(self, walltime_s: float = 0.0, vote_every: int = VOTE_EVERY):
        self.signal: str | None = None
        self.vote_every = vote_every
        self._multiprocess = jax.process_count() > 1
        self._deadline = time.monotonic() + walltime_s if walltime_s > 0 else None
        self._previous: dict[int, Any] = {}
        self._longest_step = 0.0
        self._last = time.monotonic()

    def install(self) -> "StopRequests":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name  # no I/O here: the loop reports it at the step boundary

    def reason(self, save_estimate_s: float = 0.0, step: int | None = None) -> str | None:
        """Why the run should stop now, or None. Walltime keeps room for one more step (one more interval
        between votes with several processes) and a save.

        With several processes every process must pass the same `step`: the answer is agreed at steps that
        are multiples of `vote_every` and None at the others."""
        if not self._multiprocess:
            return self._local_reason(save_estimate_s)
        if step is None:
            raise ValueError("StopRequests.reason needs the step when several processes run")
        if step % self.vote_every:
            return None
        return distributed.agree_on_stop(step, self._local_reason(save_estimate_s))

    def _local_reason(self, save_estimate_s: float) -> str | None:
        now = time.monotonic()
        self._longest_step = max(self._longest_step, now - self._last)
        self._last = now
        if self.signal:
            return self.signal
        if self._deadline is not None and now + 2 * self._longest_step + save_estimate_s >= self._deadline:
            return "walltime"
        return None
