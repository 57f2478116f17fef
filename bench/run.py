"""Run every benchmark and rewrite BENCHMARKS.md.

    python bench/run.py            # the full run (~37 min on 2 cores), writes ./BENCHMARKS.md
    python bench/run.py --quick    # ~4.5 min, smaller sizes and fewer repetitions
    python bench/run.py --only loop,first_step --out /tmp/B.md

Each section runs in its own process (bench/<section>.py --json), so one section's memory, threads and
compilations never touch another's; a section that fails is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import harness

SECTIONS = {  # key -> script, in report order
    "loop": "loop_speed.py",
    "checkpoint_cost": "checkpoint_cost.py",
    "checkpoint_io": "checkpoint_io.py",
    "save_scaling": "save_scaling.py",
    "torchscript": "torchscript_speed.py",
    "first_step": "first_step.py",
    "corpus": "corpus_speed.py",
    "md_scaling": "md_scaling.py",
    "torch_export": "torch_export_speed.py",
}
# Seconds a full section may run (--quick: 600 each). AOTInductor compiles one package per function, 8-70 s each.
FULL_TIMEOUT_S = {"torch_export": 3600}
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorstore", "grain", "torch", "numpy")


def _child_env() -> dict[str, str]:
    """The benchmarks measure the default single-device CPU setup: drop forced fake device counts (tests set
    them) and keep everything else."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    else:
        env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(harness.ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_section(key: str, quick: bool, timeout: float) -> dict:
    script = Path(__file__).with_name(SECTIONS[key])
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        out = Path(tmp) / f"{key}.json"
        argv = [sys.executable, str(script), "--json", str(out)] + (["--quick"] if quick else [])
        start = time.perf_counter()
        try:
            proc = subprocess.run(argv, env=_child_env(), capture_output=True, text=True, timeout=timeout)
            error = None if proc.returncode == 0 and out.exists() else (
                f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        except subprocess.TimeoutExpired:
            error = f"did not finish in {timeout:.0f} s"
        if error is None:
            return json.loads(out.read_text())
    return {"key": key, "title": f"{key} (failed)", "figures": [], "notes": [f"**This section failed**: {error}"],
            "seconds": time.perf_counter() - start, "error": error}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=harness.ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=harness.ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict[str, str]:
    disk = subprocess.run(["df", "-h", "--output=source,fstype,size,avail", str(harness.scratch_dir())],
                          capture_output=True, text=True).stdout.strip().splitlines()[-1:]
    return {
        "CPU": f"{_cpu_model()}, {os.cpu_count()} cores",
        "RAM": f"{_ram_gb():.1f} GiB",
        "scratch disk": f"{harness.scratch_dir()} ({' '.join(disk[0].split()) if disk else '?'})",
        "OS / Python": f"{platform.platform()} / Python {platform.python_version()}",
        "versions": ", ".join(f"{p} {_version(p)}" for p in PACKAGES),
        "trainkit": _git(),
    }


def _value(figure: dict) -> str:
    v = figure["value"]
    text = "n/a" if v != v else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return f"{text} {figure['unit']}".strip()


def _goal(figure: dict) -> str:
    if not figure["goal"]:
        return "—"
    op, target = figure["goal"]
    return f"{'≥' if op == '>=' else '≤'} {target:g} {figure['unit']}".strip()


def _result(figure: dict) -> str:
    return {True: "PASS", False: "**MISS**", None: "info"}[figure["passed"]]


def render(sections: list[dict], info: dict[str, str], quick: bool, started: datetime.datetime,
           load: tuple[float, float], seconds: float) -> str:
    cores = os.cpu_count() or 1
    lines = [
        "# trainkit benchmarks",
        "",
        f"Written by `python bench/run.py{' --quick' if quick else ''}` on {started:%Y-%m-%d %H:%M} UTC in "
        f"{seconds / 60:.1f} min{' (quick: smaller sizes, fewer repetitions)' if quick else ''}. Every figure is "
        "a ratio (or a budget) measured in the same run as its baseline, with repetitions alternating between the "
        "two sides; figures are medians of the per-repetition ratios. Rerun the command to refresh this file.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        f"| date | {started:%Y-%m-%d %H:%M} UTC |",
        f"| load average (1 min) | {load[0]:.1f} at start, {load[1]:.1f} at end, on {cores} cores |",
        "",
    ]
    if max(load) > 0.5 * cores:
        lines += [
            f"> **The machine was shared while this ran**: other work (other engineers' test suites) kept the "
            f"load average at {load[0]:.0f}–{load[1]:.0f} on {cores} cores. Absolute numbers (steps/s, GB/s, "
            "seconds) are therefore low and noisy; the ratios are measured side by side so both sides saw "
            "similar load, but expect a few percent of noise in each, more in wall-clock ones.",
            "",
        ]
    lines += ["## Summary", "", "| | figure | measured | goal | result |", "|---|---|---|---|---|"]
    for section in sections:
        lines += summary_rows(section)
    missed = [f for s in sections for f in s["figures"] if f["passed"] is False]
    lines += ["", f"{len(missed)} goal(s) missed." if missed else "All goals met.", ""]
    for section in sections:
        lines.append(render_section(section))
    return "\n".join(lines)


def summary_rows(section: dict) -> list[str]:
    """The section's rows of the Summary table."""
    number = section["title"].split(".")[0]
    rows = [f"| {number} | {figure['name']} | {_value(figure)} | {_goal(figure)} | {_result(figure)} |"
            for figure in section["figures"]]
    if section.get("error"):
        rows.append(f"| {section['key']} | (section failed) | — | — | **ERROR** |")
    return rows


def markdown(section: dict) -> str:
    """A section measured on its own, as this file writes it: its summary-table rows, then the section."""
    return "\n".join(summary_rows(section)) + "\n\n" + render_section(section)


def render_section(section: dict) -> str:
    """The section's part of BENCHMARKS.md: heading, figures (with why a goal was missed), notes, time."""
    lines = [f"## {section['title']}", ""]
    for figure in section["figures"]:
        lines.append(f"- **{figure['name']}**: {_value(figure)} (goal {_goal(figure)}, {_result(figure)}). "
                     f"{figure['measured']}.")
        if figure["passed"] is False and figure["miss"]:
            lines.append(f"  - *Why missed, and what would close it*: {figure['miss']}.")
    if section["figures"]:
        lines.append("")
    for note in section["notes"]:
        lines += [note, ""]
    lines += [f"*Section time: {section['seconds']:.0f} s.*", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (~3 min)")
    parser.add_argument("--out", type=Path, default=harness.ROOT / "BENCHMARKS.md")
    parser.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    keys = [k for k in args.only.split(",") if k] or list(SECTIONS)
    unknown = set(keys) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    started = datetime.datetime.now(datetime.timezone.utc)
    start, load_start = time.perf_counter(), harness.loadavg()
    info = machine_info()
    sections = []
    for key in keys:
        print(f"bench: {key} ...", flush=True)
        section = run_section(key, args.quick, timeout=600 if args.quick else FULL_TIMEOUT_S.get(key, 1200))
        sections.append(section)
        for figure in section["figures"]:
            print(f"  {figure['name']}: {_value(figure)} ({_result(figure)})", flush=True)
        if section.get("error"):
            print(f"  FAILED: {section['error'][-500:]}", flush=True)
    text = render(sections, info, args.quick, started, (load_start, harness.loadavg()), time.perf_counter() - start)
    args.out.write_text(text)
    print(f"bench: wrote {args.out} in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    if any(s.get("error") for s in sections):
        sys.exit(1)


if __name__ == "__main__":
    main()
