"""bench/run.py --quick runs every benchmark end to end and writes a BENCHMARKS.md with every section.

Speed is not asserted here (the numbers depend on the machine); the benchmarks' own goals are reported as
PASS/MISS in the file. This checks that the harness runs, that the report is complete, and that it judges every
goal: each one measured, its PASS/MISS what the measured number says against the goal, each MISS explained.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, cli_env

WHY_MISSED = "*Why missed, and what would close it*"
SECTIONS = [
    "## Machine",
    "## Summary",
    "## 1. Training loop",
    "## 2. Async checkpoints",
    "## 3. Checkpoint save / restore throughput",
    "## 4. Save time vs. state size",
    "## 5. TorchScript export",
    "## 6. Time to first step",
]


def summary_rows(summary: str) -> list[list[str]]:
    """The Summary table's rows: [section, figure, measured, goal, result] (header and rule left out)."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| |")]


def results_allowed(measured: str, goal: str) -> set[str]:
    """What a figure printed as `measured` ("0.933 ×") may be judged against `goal` ("≥ 0.97 ×"): both results
    when the printed digits equal the target, since rounding hides which side the value was on."""
    value, (op, target) = float(measured.split()[0]), goal.split()[:2]
    if value == float(target):
        return {"PASS", "**MISS**"}
    return {"PASS"} if (value > float(target)) == (op == "≥") else {"**MISS**"}


@pytest.mark.slow  # ~3 min on 2 cores
@pytest.mark.timeout(900)
def test_quick_benchmark_writes_every_section(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    env = cli_env(devices=1, TRAINKIT_BENCH_TMP=str(tmp_path))
    proc = subprocess.run([sys.executable, "bench/run.py", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    for heading in SECTIONS:
        assert heading in text, f"{heading!r} missing from BENCHMARKS.md:\n{text[:3000]}"
    assert "(section failed)" not in text and "**ERROR**" not in text
    for word in ("jax", "orbax-checkpoint", "torch", "cores", "RAM"):
        assert word in text
    summary = text.split("## Summary", 1)[1].split("\n## ", 1)[0]
    rows = summary_rows(summary)
    assert len([row for row in rows if row[3] != "—"]) >= 10, summary  # the goals of every section are there
    for _, name, measured, goal, result in rows:
        if goal == "—":
            assert result == "info", f"{name}: no goal, yet reported as {result}"
        else:
            assert measured != "n/a", f"{name}: its goal was not measured"
            assert result in results_allowed(measured, goal), f"{name}: {measured} against {goal} reported as {result}"
    missed = [name for _, name, _, _, result in rows if result == "**MISS**"]
    assert (f"{len(missed)} goal(s) missed." if missed else "All goals met.") in summary, summary
    for name in missed:
        detail = text.split(f"\n- **{name}**", 1)[1].split("\n- **", 1)[0]
        assert WHY_MISSED in detail, f"{name} missed its goal without saying why:{detail}"
    assert not list(tmp_path.glob("bench-*")), "a benchmark left temporary files behind"
