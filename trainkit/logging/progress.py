"""Progress: a bar with ETA and steps/s on a TTY, periodic log lines otherwise (process 0 only)."""

from __future__ import annotations

import sys
import time
from typing import Mapping

import jax


class Progress:
    def __init__(self, mode: str, start_step: int, total: int):
        self.enabled = jax.process_index() == 0 and mode != "none"
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self._bar = None
        self._start, self._total, self._t0 = start_step, total, time.perf_counter()
        if self.enabled and use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        shown = {k: v for k, v in metrics.items() if k.endswith(("loss", "accuracy", "mae")) or k == "steps_per_sec"}
        text = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(text, refresh=True)
            return
        done = step - self._start
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (self._total - step) if done else float("nan")
        print(f"step {step}/{self._total} {text} eta={eta:.0f}s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
