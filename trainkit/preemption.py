"""Stop requests: SIGTERM/SIGINT and the walltime budget end the run at a step boundary, after a save."""

from __future__ import annotations

import signal
import time



class StopRequests:
    """Set by signal handlers; the loop polls `should_stop(step)` between steps.

    A second SIGINT restores the default handler's behaviour (an immediate KeyboardInterrupt)."""

    def __init__(self, walltime_s: float = 0.0):
        self.signal: str | None = None
        self._deadline = time.monotonic() + walltime_s if walltime_s > 0 else None
        self._previous = {}
        self._longest_step = 0.0
        self._last = time.monotonic()

    def install(self) -> "StopRequests":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name  # no I/O here: the loop reports it at the step boundary

    def reason(self, save_estimate_s: float = 0.0) -> str | None:
        """Why the run should stop now, or None. Walltime keeps room for one more step and a save."""
        now = time.monotonic()
        self._longest_step = max(self._longest_step, now - self._last)
        self._last = now
        if self.signal:
            return self.signal
        if self._deadline is not None and now + 2 * self._longest_step + save_estimate_s >= self._deadline:
            return "walltime"
        return None
