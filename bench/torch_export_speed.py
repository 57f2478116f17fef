"""9. torch.export and AOTInductor: forward speed of `to_torch_export`'s artifacts vs. `jax.jit` and TorchScript,
and AOTInductor's compile time (goal: AOTInductor ≥ 1.0× JAX's speed at 1 thread, for each of trainkit's models
and for the median over the corpus).

Subjects: trainkit's own models as section 5 builds them (the default CNN, the lm_chars transformer, the dense
potential's energy + forces) and the float32 functions of tests/corpus/ as section 7 takes them. Each is exported
three ways in this process, at the same trace inputs, dynamic axes and dim constraints, and written to disk:
`to_torchscript` (`.pt`), `to_torch_export` (`.pt2`, an ExportedProgram) and `to_torch_export(compile=True)` (an
AOTInductor package, `.aoti.pt2`; its wall time is the compile time reported). Then a fresh worker process per
thread setting loads the three files back the way a user would (`torch.jit.load`, `torch.export.load(path)
.module()`, `torch._inductor.aoti_load_package`) and times them at other sizes than traced, side by side:

- AOTInductor ÷ jax.jit: JAX time ÷ AOTInductor time per call (≥ 1: the package is faster);
- `.pt2` ÷ TorchScript: TorchScript time ÷ ExportedProgram-module time per call (≥ 1: the `.pt2` is faster).

Rounds alternate the two sides of each pair; each side's time per round is the median of its calls, and a
figure is the median of the per-round ratios. Measured with each library's default threads and with both on one
thread (XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' and PJRT_NPROC=1 — the XLA
flags alone leave jax 0.10's CPU client with one Eigen thread per core —, torch.set_num_threads(1)):
the packages are compiled once (with dynamic shapes Inductor emits `#pragma omp parallel` without a thread count,
so a package follows the loading process's torch threads).

    python bench/torch_export_speed.py [--quick] [--cases jaxmd_,eqx_] [--models CNN,potential]  # markdown
    python bench/torch_export_speed.py --json OUT [--quick]                                     # bench/run.py
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from corpus_speed import select
from harness import Figure, Section
from torch_export_subjects import (FLOOR, GOAL, KINDS, MODELS, QUICK_CASES, QUICK_MODELS, ROUND_BUDGET_S,
                                   START_ENV, export_all, measure)
from torchscript_speed import SINGLE_THREAD_XLA


def _worker(ids: list[str], directory: Path, quick: bool, single: bool) -> list[dict]:
    """measure() in a fresh process: one that loads the files as a user's would (nothing compiled or traced in
    it yet), on one thread each (XLA fixes its threads when its CPU client starts) or with the defaults."""
    out = directory / ("single.json" if single else "default.json")
    env = dict(START_ENV)
    if single:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD_XLA).strip()
        env["PJRT_NPROC"] = "1"  # without it XLA still runs its 2 Eigen threads (see SINGLE_THREAD_NOTE)
    argv = [sys.executable, __file__, "--worker", str(out), "--dir", str(directory), "--ids", ",".join(ids)]
    argv += (["--single-thread"] if single else []) + (["--quick"] if quick else [])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{'1-thread' if single else 'default-thread'} worker failed: "
                           f"{proc.stderr.strip()[-1500:]}")
    return json.loads(out.read_text())


def _us(values: list[float]) -> str:
    return f"{1e6 * harness.median(values):.3g}"


def _cell(row: dict | None, pair: str, export_failed: bool) -> list[str]:
    r = (row or {}).get(pair)
    if r is None:
        return ["not compiled" if export_failed else "n/a", "—"]
    if "error" in r:
        return ["failed", r["error"].replace("|", "\\|")]
    return [f"{r['speed']:.2f} ×", f"{_us(r['base_s'])} / {_us(r['cand_s'])}"]


def _table(ids: list[str], labels: dict[str, str], measured: dict[str, list[dict]], exports: dict[str, dict]) -> str:
    by = {kind: {r["id"]: r for r in rows} for kind, rows in measured.items()}
    lines = ["| function | inputs (timed) | AOTI compile s | 1 thread: AOTI ÷ jax | jax / AOTI µs | .pt2 ÷ TS | "
             "TS / .pt2 µs | default threads: AOTI ÷ jax | jax / AOTI µs | .pt2 ÷ TS | TS / .pt2 µs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for subject_id in ids:
        done = exports[subject_id]
        aoti = done.get("aoti", {})
        cells = []
        for kind in ("single", "default"):
            row = by[kind].get(subject_id)
            cells += (_cell(row, "aoti", "error" in done["aoti"])
                      + _cell(row, "pt2", "error" in done["pt2"] or "error" in done["ts"]))
        shapes = (by["single"].get(subject_id) or by["default"].get(subject_id) or {}).get("shapes", "—")
        compile_s = f"{aoti['s']:.1f}" if "s" in aoti else "**failed**"
        lines.append(f"| {labels.get(subject_id, subject_id)} | {shapes} | {compile_s} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def _speeds(rows: list[dict], pair: str, ids: list[str]) -> dict[str, float]:
    return {r["id"]: r[pair]["speed"] for r in rows if r["id"] in ids and "speed" in r.get(pair, {})}


MISS_MODEL = {
    "CNN": (
        "the CNN is convolution-bound and AOTInductor leaves its two convolutions to aten (oneDNN "
        "`convolution`, channels-last); profiled in the `.pt2` module at 1 thread, those two calls take ≈3.8 ms "
        "of ≈5.9 ms per forward, and JAX's whole forward takes ≈5.6 ms on one core; the generated C++ (bias + "
        "relu, pooling, layout permutes) and 2 `addmm` add the rest. The ratio moves with the noise of this "
        "shared 2-core machine (--quick times 2 rounds × 5 calls). Closing it for good: faster convolutions "
        "than aten's at this size (batch 128, 8×8, 32–64 channels)"),
    "transformer": (
        "the transformer is GEMM-bound and AOTInductor leaves its GEMMs to aten: its package calls `mm` 11 times "
        "and `bmm` 6 times per forward (wrapper.cpp), and those same aten GEMMs, profiled in the `.pt2` module at "
        "1 thread, take ≈24 ms per call (`mm` 19.4 ms, `bmm` 4.4 ms), more than JAX's whole forward on one "
        "core (≈22 ms); the generated C++ (layer norms, softmax, tanh-GELU, residual adds) adds ≈5 ms. torch's "
        "sgemm was 0.86–1.09× XLA's dot on these shapes on one core (2048×128 @ 128×512: 3.33 vs 2.76 ms; "
        "2048×512 @ 512×128: 3.06 vs 2.62 ms). Closing it: faster GEMMs than aten's at 1 thread (Inductor's "
        "C++ GEMM template, `max_autotune` with the CPP backend, untested here), or fewer, larger GEMMs (q, k "
        "and v in one)"),
}
MISS_MODEL_DEFAULT = (
    "AOTInductor runs the graph as generated C++ loops plus aten calls for GEMMs and convolutions; XLA fuses and "
    "runs its own. The difference is the GEMM/convolution kernels' and the generated loops' speed")
MISS_CORPUS = (
    "the corpus's inputs are tiny (a few to a few hundred elements), so a call costs mostly fixed overheads, and "
    "AOTInductor's runner has the larger one: {floor} — most of it is `AOTICompiledModel.__call__`'s Python "
    "(pytree flattening of the inputs, ≈7 µs, and parsing the call spec on every call); the package itself "
    "(`runner.loader.boxed_run(tensors)`, C++) costs {boxed}. Closing it: call the package through its C++ "
    "entry point, or flatten inputs without pytree, in the runtime trainkit ships (trainkit.export.runtime)")


def _without_wrapper(rows: list[dict], ids: list[str]) -> str:
    """The corpus median estimated without AOTICompiledModel.__call__'s Python: each function's AOTI time minus
    that wrapper's cost per call on the floor (its call time minus `boxed_run`'s)."""
    floor = next((r for r in rows if r["id"] == FLOOR and "aoti_boxed" in r), None)
    if floor is None:
        return ""
    boxed = harness.median(floor["aoti_boxed"]["boxed_s"])
    wrapper = harness.median(floor["aoti_boxed"]["call_s"]) - boxed
    est = [harness.median(r["aoti"]["base_s"]) / max(harness.median(r["aoti"]["cand_s"]) - wrapper, boxed)
           for r in rows if r["id"] in ids and "speed" in r.get("aoti", {})]
    if not est:
        return ""
    return (f"; without the runner's Python wrapper (≈{1e6 * wrapper:.1f} µs per call, on the floor) the median "
            f"would be ≈{harness.median(est):.2f}× ({sum(e >= GOAL for e in est)} of {len(est)} at ≥ {GOAL}×; "
            "estimate: each function's AOTI time minus that cost)")


def _floor_boxed(rows: dict[str, list[dict]]) -> str:
    row = next((r for r in rows["single"] if r["id"] == FLOOR), {}).get("aoti_boxed")
    if not row:
        return "(not measured in --quick)"
    return f"{_us(row['boxed_s'])} µs per call vs {_us(row['call_s'])} µs through the Python wrapper (1 thread)"


def _floor_text(rows: dict[str, list[dict]]) -> str:
    """The floor subject's per-call times, per thread setting."""
    parts = []
    for kind, label in (("single", "1 thread"), ("default", "default threads")):
        row = next((r for r in rows[kind] if r["id"] == FLOOR), {})
        a, p = row.get("aoti", {}), row.get("pt2", {})
        if "cand_s" in a and "cand_s" in p:
            parts.append(f"{label}: AOTI {_us(a['cand_s'])} µs, jax.jit {_us(a['base_s'])} µs, .pt2 module "
                         f"{_us(p['cand_s'])} µs, TorchScript {_us(p['base_s'])} µs per call")
    return "; ".join(parts) or "the floor is not measured in --quick"


SINGLE_THREAD_NOTE = (
    "'1 thread each' needs PJRT_NPROC=1 for XLA: with the XLA_FLAGS above alone (sections 5, 7 and 8 use "
    "them), jax 0.10.2's CPU client still runs its intra-op pool of one `tf_XLAEigen` thread per core, both "
    "busy during a call — measured here, the lm_chars transformer's jax.jit forward took 13.7 ms with those "
    "flags on 2 idle cores (CPU time 1.8× wall time) and 22.7 ms pinned to one core (`taskset -c 0`); with "
    "PJRT_NPROC=1 as well, 22.3 ms, CPU time = wall time")
DEFAULT_THREADS_NOTE = (
    "With default threads (2 torch/OpenMP threads on 2 cores shared with other work), the models' packages "
    "can be many times slower than at 1 thread (CNN and transformer): each generated kernel is an "
    "`#pragma omp parallel` region, and at each region's barrier libgomp busy-waits while the other thread is "
    "descheduled. Measured apart (load average ≈1.5): the transformer's package took 28.7 ms per call at 1 "
    "thread, 75.8 ms at 2 threads, 31.3 ms at 2 threads with OMP_WAIT_POLICY=passive; the 1-thread figures "
    "are the packages' own speed. TorchScript in sections 5 and 7 shows the same effect")


def run(quick: bool, cases: str = "", models: str = "") -> Section:
    import torch

    load_start = os.getloadavg()
    threads = torch.get_num_threads()
    model_ids = [m for m in MODELS if m in (models.split(",") if models else QUICK_MODELS if quick else MODELS)]
    case_ids = select(cases or (",".join(QUICK_CASES) if quick else ""), False)
    ids = ([] if quick else [FLOOR]) + model_ids + case_ids
    section = Section("torch_export", "9. torch.export and AOTInductor: speed vs. jax.jit and TorchScript, "
                                      "compile time")
    with tempfile.TemporaryDirectory(prefix="bench-tex-", dir=harness.scratch_dir()) as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        exports = export_all(ids, directory)
        export_s = time.perf_counter() - start
        (directory / "exports.json").write_text(json.dumps(exports))
        measured = {"single": _worker(ids, directory, quick, True), "default": _worker(ids, directory, quick, False)}
    load_end = os.getloadavg()
    labels = {FLOOR: "floor: x * w + 1 (4×4)"}
    for m in model_ids:
        labels[m] = {"CNN": "CNN forward (default config)", "transformer": "transformer forward (lm_chars)",
                     "potential": "potential energy + forces (dense)"}[m]
    floor, boxed = _floor_text(measured), _floor_boxed(measured)
    load = f"load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end on {os.cpu_count()} cores"
    thread_labels = {"single": "1 thread each", "default": f"library default threads (torch {threads}, XLA all cores)"}
    for kind in ("single", "default"):
        rows = {r["id"]: r for r in measured[kind]}
        goal = (">=", GOAL) if kind == "single" else None
        for m in model_ids:
            r = rows.get(m, {}).get("aoti", {})
            value = r.get("speed", float("nan"))
            detail = (f"jax {1e3 * harness.median(r['base_s']):.3g} ms vs AOTInductor "
                      f"{1e3 * harness.median(r['cand_s']):.3g} ms per call" if "speed" in r
                      else r.get("error") or exports[m]["aoti"].get("error", "not measured"))
            section.figures.append(Figure(f"{labels[m]}, {thread_labels[kind]}: speed, AOTInductor ÷ jax.jit",
                                          value, "×", goal, detail, MISS_MODEL.get(m, MISS_MODEL_DEFAULT)))
        speeds = _speeds(measured[kind], "aoti", case_ids)
        if speeds:
            slowest, fastest = min(speeds, key=speeds.get), max(speeds, key=speeds.get)
            uncompiled = [i for i in case_ids if "error" in exports[i]["aoti"]]
            section.figures.append(Figure(
                f"corpus ({len(speeds)} of {len(case_ids)} functions compiled), {thread_labels[kind]}: median speed, "
                "AOTInductor ÷ jax.jit", harness.median(list(speeds.values())), "×", goal,
                f"{sum(v >= GOAL for v in speeds.values())} of {len(speeds)} functions at ≥ {GOAL}×; fastest "
                f"{fastest} {speeds[fastest]:.2f}×, slowest {slowest} {speeds[slowest]:.2f}×"
                + (f"; not compiled (left out): {', '.join(uncompiled)}" if uncompiled else "")
                + (_without_wrapper(measured[kind], case_ids) if kind == "single" else "") + f"; {load}",
                MISS_CORPUS.format(floor=floor, boxed=boxed)))
        pt2 = _speeds(measured[kind], "pt2", model_ids + case_ids)
        if pt2:
            slowest = min(pt2, key=pt2.get)
            section.figures.append(Figure(
                f".pt2 (ExportedProgram module) ÷ TorchScript, {thread_labels[kind]}: median speed over models and "
                f"corpus ({len(pt2)})", harness.median(list(pt2.values())), "×", None,
                f"models: {', '.join(f'{m} {pt2[m]:.2f}×' for m in model_ids if m in pt2) or 'none'}; "
                f"{sum(v >= 1 for v in pt2.values())} of {len(pt2)} at ≥ 1×; slowest {slowest} {pt2[slowest]:.2f}×"))
    compiled = {i: exports[i]["aoti"]["s"] for i in model_ids + case_ids if "s" in exports[i]["aoti"]}
    if compiled:
        worst = max(compiled, key=compiled.get)
        section.figures.append(Figure(
            f"AOTInductor compile time per package, median of {len(compiled)}", harness.median(list(compiled.values())),
            "s", None, "wall time of `to_torch_export(..., compile=True)`: translation, torch.export, AOTInductor "
            "(Inductor codegen + g++), parity check; Inductor's on-disk cache as a user has it"))
        section.figures.append(Figure("AOTInductor compile time per package, max", compiled[worst], "s", None, worst))
    by_error: dict[str, list[str]] = {}
    for i in ids:
        for k, v in exports[i].items():
            if "error" in v:
                by_error.setdefault(f"{KINDS[k]}: {v['error']}", []).append(i)
    failed = [f"{', '.join(who)} — `{error}`" for error, who in by_error.items()]
    rounds, calls = (2, 5) if quick else (7, 50)
    section.notes += [
        f"Subjects: the floor (a one-op function, the runtimes' fixed price per call), {len(model_ids)} of trainkit's "
        f"models as section 5 builds them, and {len(case_ids)} float32 corpus functions"
        f"{' (quick: a subset)' if quick else ''} as section 7 takes them, each exported three ways in one process "
        f"({export_s:.0f} s in all) and loaded back from disk in fresh worker processes (1 thread, then default "
        "threads; packages loaded with `torch._inductor.aoti_load_package`, torch's defaults: inputs not checked "
        "per call). Speeds ≥ 1 mean the candidate (AOTInductor, `.pt2`) is faster. "
        + (f"Export failures (the first line of each error): {'; '.join(failed)}." if failed
           else "Every subject exported all three ways."),
        _table(ids, labels, measured, exports),
        f"Floor (fixed cost per call): {floor}. The AOTInductor package alone (`runner.loader.boxed_run`, no "
        f"Python pytree handling): {boxed}. The `.pt2` module's price per call is torch.export's unlifted "
        "module: a Python forward that first matches the inputs' pytree structure against the exported one, "
        "runs shape guards and `_assert_tensor_metadata`, then calls each aten op from Python.",
        DEFAULT_THREADS_NOTE,
        harness.method_note(rounds, calls, ROUND_BUDGET_S, f"XLA_FLAGS='{SINGLE_THREAD_XLA}', PJRT_NPROC=1 and "
                            f"torch.set_num_threads(1) ({SINGLE_THREAD_NOTE})", load_start, load_end,
                            " Every torch call under `torch.no_grad()` (with_forces subjects compute forces in the "
                            "graph)."),
    ]
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cases", default="", help="comma-separated prefixes of float32 corpus case ids")
    parser.add_argument("--models", default="", help=f"comma-separated models of {', '.join(MODELS)}")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ids", default="", help=argparse.SUPPRESS)
    parser.add_argument("--single-thread", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        if args.single_thread:
            torch.set_num_threads(1)
        exports = json.loads((args.dir / "exports.json").read_text())
        with contextlib.redirect_stdout(io.StringIO()):
            rows = measure([i for i in args.ids.split(",") if i], args.dir, exports, args.quick)
        args.worker.write_text(json.dumps(rows))
        return
    harness.report(lambda: run(args.quick, args.cases, args.models), args.json, quiet=True)

if __name__ == "__main__":
    main()
