"""bench/run.py --quick runs every benchmark end to end and writes a BENCHMARKS.md with every section.

Speed is not asserted here (the numbers depend on the machine); the benchmarks' own goals are reported as
PASS/MISS in the file. This checks that the harness runs and that the report is complete.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, cli_env

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
    assert summary.count("PASS") + summary.count("MISS") >= 10, summary  # every goal judged
    assert not list(tmp_path.glob("bench-*")), "a benchmark left temporary files behind"
