"""Section 9's subjects (the floor, trainkit's models, the corpus functions), their export three ways
(`.pt`, `.pt2`, `.aoti.pt2`) and their timing in a worker process; bench/torch_export_speed.py runs and reports.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import harness
from corpus_speed import _corpus, _jax_callable, _quiet
from torchscript_speed import POTENTIAL_INFO, _task, random_params

GOAL = 1.0
ROUND_BUDGET_S = 0.25  # per side and round: fewer calls for slow functions
MODELS = ("CNN", "transformer", "potential")
# --quick (tests/test_bench.py runs it end to end, ~90 s): the CNN and two corpus functions whose AOTInductor
# compiles are short (8-15 s each; jaxmd_lj_dense's takes over a minute), and no floor (its compile is 12 s).
QUICK_MODELS = ("CNN",)
QUICK_CASES = ("eqx_mlp", "flax_causal_self_attention")
FLOOR = "floor"  # x * w + 1 on 4×4 floats: each runtime's fixed price per call
KINDS = {"ts": ".pt", "pt2": ".pt2", "aoti": ".aoti.pt2"}
# The workers' environment: this process's as it started, so that they load the files as a fresh process would,
# with torch's defaults, whatever exporting set here.
START_ENV = dict(os.environ)


@dataclasses.dataclass
class Subject:
    """One function to export and time: fn(params, *args), traced at `trace_args`, timed at `timed_args`."""

    id: str
    label: str
    fn: Callable[..., Any]
    params: Any
    trace_args: tuple
    timed_args: tuple
    dynamic_axes: list | None
    jax_fn: Callable[..., Any]  # jitted: fn, or (energy, forces) for with_forces
    input_names: list[str] | None = None
    with_forces: bool = False
    dim_constraints: tuple[str, ...] = ()


def _floor() -> Subject:
    import jax

    def fn(p, x):
        return x * p["w"] + 1.0

    rng = np.random.default_rng(0)
    x1, x2 = (rng.standard_normal((n, 4)).astype(np.float32) for n in (2, 4))
    return Subject(FLOOR, "floor: x * w + 1 on 4×4 floats", fn, {"w": np.ones(4, np.float32)}, (x1,), (x2,),
                   [{0: "batch"}], jax.jit(fn))


def _model(name: str) -> Subject:
    """Section 5's models (same configs, sizes, random parameters); the potential with forces."""
    import jax

    from trainkit.export.parity import TRACE_DIMS
    from trainkit.models.potential import energy_and_forces

    if name == "CNN":
        config, task = _task("default", {"num_classes": 10, "image_shape": (8, 8, 1)})
        label, dims = f"CNN forward (digits, batch {config.batch_size})", {"batch": config.batch_size}
    elif name == "transformer":
        config, task = _task("lm_chars", {"vocab_size": 256, "seq_len": 64})
        label = f"transformer forward (lm_chars, {config.batch_size}×{config.data.seq_len} tokens)"
        dims = {"batch": config.batch_size, "seq": config.data.seq_len}
    else:
        config, task = _task("potential_dense", POTENTIAL_INFO)
        label, dims = f"potential energy + forces ({config.batch_size}×32 atoms)", {"batch": config.batch_size,
                                                                                 "atoms": 32}
    forces = name == "potential"
    jitted = (jax.jit(lambda p, *a: energy_and_forces(task.predict, p, *a)) if forces else jax.jit(task.predict))
    return Subject(name, label, task.predict, random_params(task), tuple(task.example_inputs(0, TRACE_DIMS)),
                   tuple(task.example_inputs(1, dims)),
                   [{i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in task.inputs], jitted,
                   [s.name for s in task.inputs], forces)


def build(subject_id: str) -> Subject:
    if subject_id == FLOOR:
        return _floor()
    if subject_id in MODELS:
        return _model(subject_id)
    case = _corpus().build(subject_id)
    return Subject(case.name, case.name, case.fn, case.params, case.args1, case.args2, case.dynamic_axes,
                   _jax_callable(case), None, case.with_forces, case.dim_constraints)


def _error(e: BaseException) -> str:
    line = next((x.strip() for x in str(e).splitlines() if x.strip()), "")
    return f"{type(e).__name__}: {line[:200]}"


def export_all(ids: list[str], directory: Path) -> dict[str, dict]:
    """Write each subject's `.pt`, `.pt2` and AOTInductor package to `directory`; returns id -> kind -> {"s"}
    (wall seconds of the export call, parity check and save included) or {"error"}."""
    import torch

    from trainkit.export import to_torch_export, to_torchscript

    results: dict[str, dict] = {}
    for subject_id in ids:
        results[subject_id] = {}
        with _quiet():
            try:
                s = build(subject_id)
            except Exception as e:  # noqa: BLE001 - reported in the table, the others still run
                results[subject_id] = {k: {"error": _error(e)} for k in KINDS}
                continue
            common = dict(dynamic_axes=s.dynamic_axes, input_names=s.input_names, with_forces=s.with_forces,
                          dim_constraints=s.dim_constraints)
            for kind, suffix in KINDS.items():
                path = str(directory / f"{subject_id}{suffix}")
                start = time.perf_counter()
                try:
                    if kind == "ts":
                        module = to_torchscript(s.fn, s.params, s.trace_args, **common)
                        torch.jit.save(module, path)
                    else:
                        to_torch_export(s.fn, s.params, s.trace_args, path, compile=kind == "aoti", **common)
                    results[subject_id][kind] = {"s": time.perf_counter() - start}
                except Exception as e:  # noqa: BLE001
                    results[subject_id][kind] = {"error": _error(e)}
    return results


def measure(ids: list[str], directory: Path, exports: dict[str, dict], quick: bool) -> list[dict]:
    """Load each subject's files from `directory` and time them (this process's thread settings): jax.jit vs
    the AOTInductor package, TorchScript vs the `.pt2` module."""
    import jax
    import torch
    import torch._inductor  # aoti_load_package

    rounds, calls = (2, 5) if quick else (7, 50)
    results = []
    for subject_id in ids:
        done = exports[subject_id]
        row: dict[str, Any] = {"id": subject_id}
        with _quiet():
            s = build(subject_id)
            args = [np.ascontiguousarray(np.asarray(a)) for a in s.timed_args]
            row["shapes"] = " ".join("×".join(map(str, a.shape)) or "()" for a in args)
            tensors = [torch.from_numpy(a) for a in args]
            params = jax.device_put(s.params)
            jax_args = [jax.device_put(a) for a in args]

            def jax_fn():
                return jax.block_until_ready(s.jax_fn(params, *jax_args))

            def runs(run):
                def call():
                    with torch.no_grad():
                        return run(*tensors)
                return call

            path = {k: str(directory / f"{subject_id}{suffix}") for k, suffix in KINDS.items()}
            pairs = {"aoti": ("jax", "aoti"), "pt2": ("ts", "pt2")}
            for pair, (base, cand) in pairs.items():
                if any("error" in done[k] for k in {base, cand} - {"jax"}):
                    continue
                try:
                    loaded = {}
                    for kind in {base, cand} - {"jax"}:
                        start = time.perf_counter()
                        loaded[kind] = (torch.jit.load(path[kind]).eval() if kind == "ts" else
                                        torch.export.load(path[kind]).module() if kind == "pt2" else
                                        torch._inductor.aoti_load_package(path[kind]))
                        row[f"load_{kind}_s"] = time.perf_counter() - start
                    base_fn = jax_fn if base == "jax" else runs(loaded[base])
                    base_s, cand_s = harness.time_pair(base_fn, runs(loaded[cand]), rounds, calls, ROUND_BUDGET_S)
                    row[pair] = {"base_s": base_s, "cand_s": cand_s, "speed": harness.paired_ratio(base_s, cand_s)}
                    if subject_id == FLOOR and cand == "aoti":  # the package's own cost, without the Python wrapper
                        boxed = loaded["aoti"].loader.boxed_run
                        call_s, boxed_s = harness.time_pair(runs(loaded["aoti"]), lambda: boxed(list(tensors)),
                                                            rounds, calls, ROUND_BUDGET_S)
                        row["aoti_boxed"] = {"call_s": call_s, "boxed_s": boxed_s}
                except Exception as e:  # noqa: BLE001 - a file that does not load or run is reported as such
                    row[pair] = {"error": _error(e)}
        results.append(row)
    return results
