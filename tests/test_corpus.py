"""The third-party corpus (tests/corpus/, issue #14 item 4), exported and run in a process without JAX.

Each case is exported at size 1 with `to_torchscript(..., path=...)`. A persistent torch-only worker (one per
test module run; it asserts that JAX was never imported) loads the .pt (or a torch.export `.pt2`, or an
AOTInductor `.aoti.pt2`: tests/test_torch_export.py) and calls it 3 times per input set, at
size 1 and size 2, with and without requires_grad on the first input, and writes outputs and, for float first
inputs, d sum(first output) / d first input (torch autograd) to .npz. The parent compares with jax.jit:
outputs, and gradients (forces = -grad for with_forces cases, which return them from the graph itself), to
|d| <= atol + rtol * max|ref|; the 3 calls must be bitwise identical and finite wherever JAX is finite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import corpus
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainkit.export.torchscript import to_torchscript

TOL = {"float32": (1e-4, 1e-5), "float64": (1e-9, 1e-11), "bfloat16": (2e-2, 2e-2)}  # (rtol, atol)
CALLS = 3
pytestmark = [pytest.mark.slow,  # ~4 min for the 67 cases
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")]

WORKER = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    assert "jax" not in sys.modules and "trainkit" not in sys.modules
    DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}

    def load(path):
        if path.endswith(".aoti.pt2"):
            return torch._inductor.aoti_load_package(path)
        if path.endswith(".pt2"):
            return torch.export.load(path).module()
        return torch.jit.load(path)

    def run(job):
        module = load(job["pt"])
        for s, size in enumerate(job["sizes"]):
            data = np.load(size["inputs"], allow_pickle=False)
            arrays = [data[f"a{i}"] for i in range(len(size["dtypes"]))]
            for rg in job["requires_grad"]:
                results = {}
                for call in range(job["calls"]):
                    args = [torch.from_numpy(a.copy()).to(DTYPES.get(d, None) or torch.from_numpy(a).dtype)
                            for a, d in zip(arrays, size["dtypes"])]
                    if rg:
                        args[0].requires_grad_(True)
                    out = module(*args)
                    out = [out] if isinstance(out, torch.Tensor) else list(out)
                    for k, o in enumerate(out):
                        results[f"c{call}_out{k}"] = o
                    if rg and job["grad"] and out[0].requires_grad:
                        (g,) = torch.autograd.grad([out[0].sum()], [args[0]], allow_unused=True)
                        results[f"c{call}_grad"] = torch.zeros_like(args[0]) if g is None else g
                    elif rg and job["grad"]:
                        results[f"c{call}_grad"] = torch.zeros_like(args[0])
                np.savez(f"{job['out']}_s{s}_rg{int(rg)}.npz", **{
                    k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy()
                    for k, v in results.items()})

    for line in sys.stdin:
        job = json.loads(line)
        try:
            run(job)
            reply = {"ok": True}
        except BaseException as e:  # noqa: BLE001 - report it, keep serving
            lines = [l for l in str(e).strip().splitlines() if l.strip()]
            reply = {"ok": False, "error": f"{type(e).__name__}: " + " | ".join(lines[-3:])[:600]}
        assert "jax" not in sys.modules and "trainkit" not in sys.modules
        print(json.dumps(reply), flush=True)
""")


class Worker:
    """A torch-only `python -c WORKER` fed one JSON job per line; restarted if it dies."""

    def __init__(self, cwd: Path):
        self.cwd, self.proc = cwd, None

    def start(self):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=self.cwd, env=env)

    def run(self, job: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-1500:]
            self.proc = None
            return {"ok": False, "error": f"worker died: {err.strip().splitlines()[-1] if err.strip() else '?'}"}
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("corpus_worker"))
    yield w
    w.close()


def _is_float(a) -> bool:
    return jnp.issubdtype(np.asarray(a).dtype, jnp.floating)


def references(case: corpus.Case, args: tuple) -> tuple[list[np.ndarray], np.ndarray | None]:
    """jax.jit outputs (with_forces: energy and forces = -grad) and d sum(first output)/d args[0] (or None)."""
    def first_sum(x, *rest):
        return jnp.sum(jax.tree.leaves(case.fn(case.params, x, *rest))[0])

    with jax.default_matmul_precision("highest"):
        outs = [np.asarray(o) for o in jax.tree.leaves(jax.jit(case.fn)(case.params, *args))]
        grad = None
        if _is_float(args[0]) and _is_float(outs[0]):
            try:
                grad = np.asarray(jax.jit(jax.grad(first_sum))(*args))
            except ValueError as e:  # JAX itself cannot differentiate it (while_loop): compare outputs only
                if "Reverse-mode differentiation does not work" not in str(e):
                    raise
    if case.with_forces:
        outs = [outs[0], -grad]
        grad = None
    return outs, grad


def compare(what: str, got: np.ndarray, ref: np.ndarray, dtype: str) -> str | None:
    rtol, atol = TOL[dtype]
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return f"{what}: shape {got.shape} != JAX {ref.shape}"
    g, r = got.astype(np.float64), ref.astype(np.float64)
    finite = np.isfinite(r)
    if not np.all(np.isfinite(g[finite])):
        return f"NaN/inf: {what} has {int((~np.isfinite(g[finite])).sum())} non-finite values where JAX is finite"
    if not np.array_equal(np.isnan(g[~finite]), np.isnan(r[~finite])):
        return f"{what}: non-finite values differ from JAX's"
    if not finite.any():
        return None
    d = np.abs(g[finite] - r[finite])
    scale = float(np.abs(r[finite]).max())
    bound = atol + rtol * scale
    if d.max() > bound:
        return f"mismatch: {what} max|d|={d.max():.3g} > {bound:.3g} (max|ref|={scale:.3g})"
    return None


def numpy_inputs(args: tuple) -> tuple[dict, list[str]]:
    arrays, dtypes = {}, []
    for i, a in enumerate(args):
        a = np.asarray(a)
        dtypes.append("bfloat16" if a.dtype.name == "bfloat16" else a.dtype.name)
        arrays[f"a{i}"] = a.astype(np.float32) if a.dtype.name == "bfloat16" else a
    return arrays, dtypes


@pytest.mark.parametrize("case_id", corpus.case_ids())
def test_corpus_case(case_id, worker, tmp_path):
    with jax.enable_x64(case_id.endswith("-f64")):
        case = corpus.build(case_id)
        pt = tmp_path / f"{case_id}.pt"
        error = None
        try:
            to_torchscript(case.fn, case.params, case.args1, str(pt), dynamic_axes=case.dynamic_axes,
                           with_forces=case.with_forces, dim_constraints=case.dim_constraints)
        except Exception as e:  # noqa: BLE001 - the first line is the report
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            at = next((line.strip() for line in lines if line.startswith("RuntimeError:")), "")
            error = f"export error: {type(e).__name__}: {(lines or [''])[0][:300]}" + (f" [{at[:200]}]" if at else "")
        if error:
            pytest.fail(error, pytrace=False)
    check_artifact(case, pt, worker, tmp_path)


def check_artifact(case: corpus.Case, path: Path, worker: Worker, tmp_path: Path, autograd: bool = True) -> None:
    """Run the exported `path` in the torch-only worker at both sizes, CALLS calls each (and, with `autograd`,
    with requires_grad on the first input), and fail on any difference from JAX or between calls."""
    with jax.enable_x64(case.dtype == "float64"):
        refs = [references(case, args) for args in (case.args1, case.args2)]
    sizes = []
    for s, args in enumerate((case.args1, case.args2)):
        arrays, dtypes = numpy_inputs(args)
        np.savez(tmp_path / f"in{s}.npz", **arrays)
        sizes.append({"inputs": str(tmp_path / f"in{s}.npz"), "dtypes": dtypes})
    grad = refs[0][1] is not None
    requires_grad = [False, True] if autograd and _is_float(case.args1[0]) else [False]
    job = {"pt": str(path), "sizes": sizes, "requires_grad": requires_grad, "calls": CALLS, "grad": grad,
           "out": str(tmp_path / "res")}
    reply = worker.run(job)
    if not reply["ok"]:
        pytest.fail(f"run-time error: {reply['error']}", pytrace=False)
    problems = []
    for s, (outs, gref) in enumerate(refs):
        for rg in requires_grad:
            res = np.load(tmp_path / f"res_s{s}_rg{int(rg)}.npz", allow_pickle=False)
            n_out = len([k for k in res.files if k.startswith("c0_out")])
            if n_out != len(outs):
                problems.append(f"size{s + 1}: {n_out} outputs, JAX {len(outs)}")
                continue
            keys = [f"out{k}" for k in range(n_out)] + (["grad"] if rg and grad else [])
            for key in keys:
                first = res[f"c0_{key}"]
                for call in range(1, CALLS):
                    other = res[f"c{call}_{key}"]
                    if not (first.shape == other.shape and np.array_equal(first, other, equal_nan=True)):
                        problems.append(f"call-to-call difference: {key} size{s + 1} rg={rg} call 1 vs {call + 1}, "
                                        f"max|d|={np.nanmax(np.abs(first - other)):.3g}")
                        break
                label = "forces" if case.with_forces and key == "out1" else key
                for call in range(CALLS):
                    ref = gref if key == "grad" else outs[int(key[3:])]
                    err = compare(f"{label} size{s + 1} rg={rg} call{call + 1}", res[f"c{call}_{key}"], ref,
                                  case.dtype)
                    if err:
                        problems.append(err)
                        break
    if problems:
        pytest.fail(f"{problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                    pytrace=False)
