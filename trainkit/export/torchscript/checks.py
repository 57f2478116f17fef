"""What every TorchScript export is checked with: `parity` against JAX (outputs and forces, several calls, on the
example inputs and on a copy one shorter along each dynamic axis) and `call_repeatedly` (the same bits on every
call). Run-time failures inside the TorchScript interpreter become one `TrainkitError` line."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax._src import core

from trainkit.errors import TrainkitError
from trainkit.export.formats import relative_error
from trainkit.export.torchscript.tracing import Bound

PARITY_TOLERANCE = 1e-4  # max_rel accepted at export in float32; translations land around 1e-6
# By the narrowest float dtype among the inputs and outputs (parity_tolerance="auto"): bf16 keeps 8 bits.
TOLERANCES = {"bfloat16": 3e-2, "float16": 3e-3, "float32": PARITY_TOLERANCE, "float64": 1e-9}
REPEAT_CALLS = 3  # parity calls the module this often on each input set: it must answer the same every time


def parity(fn: Callable[..., Any], params: Any, module: Callable[..., Any], args: Sequence[Any],
           with_forces: bool = False, calls: int = REPEAT_CALLS) -> dict[str, float]:
    """Compare `module(*args)`, called `calls` times, with `fn(params, *args)` in JAX (and forces when
    `with_forces`).

    Returns `{"max_abs": ..., "max_rel": ...}` over all outputs (`formats.relative_error`: relative to each
    output's largest magnitude, at least 0.1; NaNs in the same places count as equal). Raises `TrainkitError` if
    the module's outputs change from one call to the next (TorchScript optimizes a graph on its second call).
    """
    args = tuple(np.asarray(a) for a in args)

    def first_output_sum(x: jax.Array) -> jax.Array:
        return jnp.sum(jax.tree.leaves(fn(params, x, *args[1:]))[0])

    with jax.default_matmul_precision("highest"):  # a GPU default (TF32) would make a poor reference
        ref = jax.tree.leaves(jax.jit(fn)(params, *args))
        if with_forces:
            ref = [ref[0], -jax.jit(jax.grad(first_output_sum))(args[0])]
    buffers = module.buffers() if isinstance(module, torch.nn.Module) else iter(())
    device = next(iter(buffers), torch.empty(0)).device
    got = call_repeatedly(module, [to_tensor(a).to(device) for a in args], calls)
    if len(got) != len(ref):
        raise TrainkitError(f"the module returned {len(got)} outputs, JAX {len(ref)}")
    max_abs, max_rel = 0.0, 0.0
    for g, r in zip(got, ref):
        try:
            err, rel = relative_error(np.asarray(r), g.detach().cpu().to(torch.float64).numpy())
        except TrainkitError:
            return {"max_abs": float("inf"), "max_rel": float("inf")}
        max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
    return {"max_abs": max_abs, "max_rel": max_rel}


def call_repeatedly(module: Callable[..., Any], inputs: Sequence[torch.Tensor],
                    calls: int = REPEAT_CALLS) -> list[torch.Tensor]:
    """The module's outputs (as a list) after `calls` calls on `inputs`; `TrainkitError` unless every call gave
    bit-identical outputs (TorchScript's profiling executor rewrites the graph after the first calls, so a
    module that is right once is not yet right)."""
    first: list[torch.Tensor] | None = None
    for k in range(calls):
        with torch.no_grad():
            try:
                out = module(*inputs)
            except RuntimeError as e:  # torch.jit.Error included: the op and the generated line, in one line
                raise TrainkitError(f"the exported module failed at run time (call {k + 1}) on inputs of shape "
                                    f"{[tuple(x.shape) for x in inputs]}: {_interpreter_error(e)}; this is a "
                                    "converter bug, please report it with the model") from None
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        if first is None:
            first = outs
        elif not all(torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0,
                                                                                   equal_nan=True))
                     for a, b in zip(first, outs)):
            raise TrainkitError(f"the exported module's outputs changed between call 1 and call {k + 1} on the same "
                                "inputs; this is a converter bug, please report it with the model")
    return first or []


def _interpreter_error(error: Exception) -> str:
    """The TorchScript interpreter's error in one line: the failing generated line and torch's own message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if line.startswith(("RuntimeError:", "AssertionError:"))),
                   lines[-1] if lines else type(error).__name__)
    code = next((lines[i - 1] for i, line in enumerate(lines) if i and line.endswith("<--- HERE")), "")
    return f"{message} at `{code}`" if code else message


def tolerance(args: tuple, closed: core.ClosedJaxpr) -> float:
    dtypes = [np.dtype(a.dtype).name for a in args] + [np.dtype(v.dtype).name for v in closed.out_avals]
    return max((TOLERANCES[d] for d in dtypes if d in TOLERANCES), default=PARITY_TOLERANCE)


def checked_parity(fn: Callable[..., Any], params: Any, module: Callable[..., Any], args: tuple,
                   axes: list[dict[int, str]], bounds: list[Bound], with_forces: bool,
                   tolerance: float | str, kind: str = "TorchScript") -> dict[str, Any]:
    """`parity` on the example inputs and, where there are dynamic axes, on a copy one shorter along each of
    them (skipped if JAX itself cannot run it, e.g. indices into a shortened axis); raises past `tolerance`."""
    worst: dict[str, Any] = {"max_abs": 0.0, "max_rel": 0.0, "sizes": []}
    for k, inputs in enumerate([args, *_shortened(args, axes, bounds)]):
        if k > 0:
            try:
                jax.block_until_ready(jax.jit(fn)(params, *inputs))
            except Exception:  # noqa: BLE001 (not a valid input for this function: check the example size only)
                continue
        report = parity(fn, params, module, inputs, with_forces=with_forces)
        worst["sizes"].append([list(a.shape) for a in inputs])
        worst["max_abs"], worst["max_rel"] = max(worst["max_abs"], report["max_abs"]), max(worst["max_rel"],
                                                                                          report["max_rel"])
        if not report["max_rel"] <= tolerance:
            shapes = ", ".join(str(tuple(a.shape)) for a in inputs)
            raise TrainkitError(f"{kind} export does not match JAX on inputs of shape {shapes}: max_rel="
                                f"{report['max_rel']:.3g}, max_abs={report['max_abs']:.3g} (tolerance "
                                f"{tolerance:g}); this is a converter bug, please report it with the model")
    return worst


def _shortened(args: tuple, axes: list[dict[int, str]], bounds: list[Bound]) -> list[tuple]:
    """The inputs cut one shorter along every dynamic axis longer than 1 that its bounds allow (none if there is
    no such axis)."""
    sizes = {sym: a.shape[i] for a, spec in zip(args, axes) for i, sym in spec.items()}
    new = {sym: n - 1 for sym, n in sizes.items() if n > 1 and all(b.allows(n - 1) for b in bounds if b.sym == sym)}
    if not new or any(_indexes_past(a, sizes, new) for a in args):
        return []
    out = []
    for a, spec in zip(args, axes):
        index = tuple(slice(0, new[spec[i]]) if spec.get(i) in new else slice(None) for i in range(a.ndim))
        out.append(np.array(a[index], copy=True))  # (ascontiguousarray would make a 0-d input 1-d)
    return [tuple(out)]


def _indexes_past(a: np.ndarray, sizes: dict[str, int], new: dict[str, int]) -> bool:
    """An integer input that looks like indices into a dynamic axis (neighbor-list atom indices: all in range of
    its size, the last element included) would point past the shortened axis; JAX clamps such an index and the
    translation need not, so the cut inputs would test nothing but that."""
    if not np.issubdtype(a.dtype, np.integer) or a.size == 0 or a.min() < 0:
        return False
    top = int(a.max())
    return any(top < sizes[sym] and top >= n for sym, n in new.items())


def to_tensor(value: np.ndarray) -> torch.Tensor:
    """A contiguous copy (an AOTInductor package assumes the strides it was traced with: the example's must be
    the contiguous ones its callers pass; `runtime.CheckedPackage` makes every input contiguous)."""
    if value.dtype.name == "bfloat16":
        return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16).contiguous()
    return torch.from_numpy(np.array(value, copy=True, order="C"))
