"""What every benchmark section shares: the figure it reports, interleaved side-by-side timing, and its CLI.

A section is a module with `run(quick: bool) -> Section`; `python bench/<section>.py [--quick] [--json OUT]` runs
it alone, and `bench/run.py` runs them all (each in its own process) and writes BENCHMARKS.md.

Every figure is a ratio (or a budget) measured in the same run as its baseline: candidate and baseline alternate
A B B A A B ..., and the figure is the median of the per-repetition ratios, so a machine that gets busier or
quieter during the run moves both sides alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # sections import trainkit and configs from the checkout they live in
    sys.path.insert(0, str(ROOT))

GOAL_OPS = {">=": lambda v, g: v >= g, "<=": lambda v, g: v <= g}


@dataclasses.dataclass(frozen=True)
class Figure:
    """One reported number. `goal` is (">=" | "<=", value) or None (reported for context only).

    `measured` says what was compared ("trainkit 30.1 steps/s vs bare 31.0"); `miss` says why a missed goal is
    missed and what would close it (shown only when the goal is missed)."""

    name: str
    value: float
    unit: str
    goal: tuple[str, float] | None = None
    measured: str = ""
    miss: str = ""

    @property
    def passed(self) -> bool | None:
        if self.goal is None or self.value != self.value:  # NaN: not measured
            return None
        op, target = self.goal
        return GOAL_OPS[op](self.value, target)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}


@dataclasses.dataclass
class Section:
    """A section of BENCHMARKS.md: its figures, then free-form notes (method, tables, diagnosis)."""

    key: str
    title: str
    figures: list[Figure] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "figures": [f.to_json() for f in self.figures],
                "notes": self.notes, "seconds": self.seconds}


def interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call each run `repeats` times, alternating the order (A B, B A, A B, ...); returns each run's results."""
    names = list(runs)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(runs[name]())
    return results


def time_pair(jax_fn: Callable[[], Any], torch_fn: Callable[[], Any], rounds: int, calls: int,
              budget_s: float) -> tuple[list[float], list[float]]:
    """Seconds per call of each side, per round: warm-up (compilation, TorchScript's profiling runs), then
    `rounds` rounds alternating which side goes first, at most `calls` calls per side and round (fewer when a
    call is slow: about `budget_s` per side and round)."""
    for fn in (jax_fn, torch_fn):
        for _ in range(5):
            fn()
    slowest = max(seconds_per_call(jax_fn, 3), seconds_per_call(torch_fn, 3))
    calls = max(3, min(calls, int(budget_s / slowest)))  # a slow side must not stretch the run
    jax_s: list[float] = []
    torch_s: list[float] = []
    for r in range(rounds):
        order = [(jax_fn, jax_s), (torch_fn, torch_s)]
        for fn, out in order if r % 2 == 0 else order[::-1]:
            out.append(seconds_per_call(fn, calls))
    return jax_s, torch_s


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repetitions of numerator[i] / denominator[i] (the pairs ran back to back)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    """`median (min–max)` of repeated measurements, for the notes."""
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    """Median wall seconds of `calls` calls of fn."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (`VmRSS`) or its peak since the last `reset_peak_rss()` (`VmHWM`)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def loadavg() -> float:
    return os.getloadavg()[0]


def scratch_dir() -> Path:
    """Where sections write temporary files (removed by each section): $TRAINKIT_BENCH_TMP or /tmp."""
    return Path(os.environ.get("TRAINKIT_BENCH_TMP", "/tmp"))


def reuse_compilations(directory: Path) -> None:
    """Persist XLA compilations in `directory` for this process: sections that repeat a run compile once, so
    repetitions are cheap. Timed windows never include compilation either way."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def method_note(rounds: int, calls: int, budget_s: float, single_thread: str, load_start: Sequence[float],
                load_end: Sequence[float], extra: str = "") -> str:
    """The closing note of a paired-speed section (time_pair): versions, rounds, the 1-thread setting, load."""
    import jax
    import torch

    def load(values: Sequence[float]) -> str:
        return ", ".join(f"{v:.2f}" for v in values)

    return (f"torch {torch.__version__}, jax {jax.__version__}. {rounds} alternating rounds × up to {calls} calls per "
            f"side (fewer when a call is slow: ≤ {budget_s} s per side and round); speed = median of the per-round "
            f"ratios.{extra} '1 thread each': a fresh process with {single_thread}. Load average (1, 5, 15 min) at "
            f"start {load(load_start)}, at end {load(load_end)}, on {os.cpu_count()} cores.")


def main(run: Callable[[bool], Section]) -> None:
    """The CLI of one section: `--quick` for the short variant, `--json OUT` to write the result there."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report(lambda: run(args.quick), args.json)


def report(run: Callable[[], Section], json_path: Path | None, quiet: bool = False) -> None:
    """Run a section, timed: write it as JSON to `json_path` (what bench/run.py reads), or print it as the
    markdown of BENCHMARKS.md. `quiet`: swallow what the run prints (some corpus libraries print on import)."""
    import contextlib
    import io

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        section = run()
    section.seconds = time.perf_counter() - start
    if json_path:
        json_path.write_text(json.dumps(section.to_json(), indent=2))
    else:
        import run as rendering  # bench/run.py renders sections: the same text as in BENCHMARKS.md

        print(rendering.markdown(section.to_json()))
