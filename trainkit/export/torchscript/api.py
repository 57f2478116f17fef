"""`to_torchscript` and `parity`: trace `fn` to a jaxpr with symbolic dimensions, translate it with an `Emitter`
over `registry.RULES` into the source of an `nn.Module.forward`, script it with the parameters as buffers, and
check it against JAX on the example inputs.
"""

from __future__ import annotations

import dataclasses
import keyword
import linecache
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax._src import core
from jax._src.interpreters import partial_eval as pe

from trainkit.errors import TrainkitError
from trainkit.export.formats import relative_error
from trainkit.export.torchscript.emitter import Emitter, is_key
from trainkit.export.torchscript.registry import RULES, plan_fusions

DynamicAxes = Sequence[Mapping[int, str] | None] | Mapping[str, Mapping[int, str]]
PARITY_TOLERANCE = 1e-4  # max_rel accepted at export in float32; translations land around 1e-6
# By the narrowest float dtype among the inputs and outputs (parity_tolerance="auto"): bf16 keeps 8 bits.
TOLERANCES = {"bfloat16": 3e-2, "float16": 3e-3, "float32": PARITY_TOLERANCE, "float64": 1e-9}
REPEAT_CALLS = 3  # parity calls the module this often on each input set: it must answer the same every time
_GENERATED_MODULE = "trainkit_torchscript"
_script_count = 0


def to_torchscript(fn: Callable[..., Any], params: Any, example_args: Sequence[Any], path: str | None = None, *,
                   dynamic_axes: DynamicAxes | None = None, input_names: Sequence[str] | None = None,
                   output_names: Sequence[str] | None = None, with_forces: bool = False,
                   extra_files: Mapping[str, str] | None = None, dim_constraints: Sequence[str] = (),
                   parity_tolerance: float | str | None = "auto") -> torch.jit.ScriptModule:
    """Translate `fn(params, *args)` into a scripted module whose `forward(*args)` computes the same.

    dynamic_axes: per argument `{axis: "name"}` (a sequence aligned with `example_args`, `None` for a fully
      static argument) or a mapping from input name to such a dict; equal names must be equal sizes, e.g.
      `[{0: "batch", 1: "atoms"}, {0: "batch", 1: "atoms"}]` for positions and species.
    dim_constraints: bounds on dynamic sizes, `"seq <= 64"` or `"batch >= 1"` (jax.export's symbolic
      constraints): what lets a model that computes `min(64, seq)` (Hugging Face's GPT-2) trace with a dynamic
      `seq`. The module asserts them on every call.
    with_forces: `forward` returns `(output0, forces)`, forces = -∂ sum(output0) / ∂ args[0], computed by the
      translation of JAX's own derivative (`with_jax_forces`), not by torch autograd: JAX's forces on every call,
      under any TorchScript executor, from Python or C++. Otherwise `forward` returns what `fn` returns: one
      tensor, or a tuple of the flattened outputs. Either way torch autograd also flows through the module.
    path: also `torch.jit.save` there, with `extra_files` (name -> text) embedded. The file needs only torch
      (Python or C++ libtorch); `torch.jit.load(path, map_location="cuda")` runs it on a GPU.

    Inputs are cast to the example dtypes (int64 token ids work); params become buffers in their own dtype.

    The measured `parity(...)` (REPEAT_CALLS calls each, on `example_args` and on a copy one shorter along each
    dynamic axis) is attached as `module.parity`, with the shapes checked under "sizes"; an export whose max_rel
    exceeds `parity_tolerance` ("auto": `TOLERANCES` of the narrowest float dtype among inputs and outputs, 1e-4
    in float32), or whose answer changes between calls, raises `TrainkitError`.
    `parity_tolerance=None` skips that check (and
    `module.parity` is None) for a caller that checks the module itself, on other inputs
    (`trainkit.export.pt`). `output_names` are recorded as `module.output_names`.
    """
    args = tuple(np.asarray(a) for a in example_args)
    names = _input_names(input_names, len(args))
    axes = _normalize_axes(dynamic_axes, names, args)
    bounds = _parse_constraints(dim_constraints, axes)
    if with_forces and (not args or not np.issubdtype(args[0].dtype, np.floating)):
        raise TrainkitError("with_forces=True differentiates with respect to the first input, which must be a "
                            "float array (e.g. positions)")
    closed, n_outputs = _trace(with_jax_forces(fn) if with_forces else fn, params, args, axes, bounds)
    try:
        source, buffers = _generate(closed, params, args, names, axes, bounds, n_outputs)
    except TrainkitError as e:
        missing = re.search(r"primitive '([^']+)'", str(e))
        if not with_forces or missing is None or missing[1] in _primitives(_trace(fn, params, args, axes, bounds)[0]):
            raise
        raise TrainkitError(f"{e} (it is in JAX's derivative of the model, which with_forces=True translates: "
                            "export without with_forces and differentiate the module with torch autograd, or "
                            "avoid the operation whose derivative needs it)") from None
    module = _script(source, buffers)
    report = None
    if parity_tolerance == "auto":
        parity_tolerance = _tolerance(args, closed)
    if parity_tolerance is not None:
        report = _checked_parity(fn, params, module, args, axes, bounds, with_forces, parity_tolerance)
    module.parity = report
    module.input_names = list(names)
    module.output_names = list(output_names) if output_names else None
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(module, path, _extra_files=dict(extra_files or {}))
    return module


def parity(fn: Callable[..., Any], params: Any, module: torch.nn.Module, args: Sequence[Any],
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
    device = next(iter(module.buffers()), torch.empty(0)).device
    got = call_repeatedly(module, [_to_tensor(a).to(device) for a in args], calls)
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


def _primitives(closed: core.ClosedJaxpr) -> set[str]:
    """The names of the primitives in a jaxpr and its sub-jaxprs."""
    names: set[str] = set()
    todo = [closed.jaxpr]
    while todo:
        jaxpr = todo.pop()
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            todo.extend(core.jaxprs_in_params(eqn.params))
    return names


def _interpreter_error(error: Exception) -> str:
    """The TorchScript interpreter's error in one line: the failing generated line and torch's own message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = next((line for line in reversed(lines) if line.startswith(("RuntimeError:", "AssertionError:"))),
                   lines[-1] if lines else type(error).__name__)
    code = next((lines[i - 1] for i, line in enumerate(lines) if i and line.endswith("<--- HERE")), "")
    return f"{message} at `{code}`" if code else message


def _tolerance(args: tuple, closed: core.ClosedJaxpr) -> float:
    dtypes = [np.dtype(a.dtype).name for a in args] + [np.dtype(v.dtype).name for v in closed.out_avals]
    return max((TOLERANCES[d] for d in dtypes if d in TOLERANCES), default=PARITY_TOLERANCE)


def _checked_parity(fn: Callable[..., Any], params: Any, module: torch.jit.ScriptModule, args: tuple,
                    axes: list[dict[int, str]], bounds: list[Bound], with_forces: bool,
                    tolerance: float | str) -> dict[str, Any]:
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
            raise TrainkitError(f"TorchScript export does not match JAX on inputs of shape {shapes}: max_rel="
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


def with_jax_forces(fn: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    """`fn` -> `(params, *args) -> (output0, -d sum(output0) / d args[0])`, the derivative taken by JAX.

    The exported module evaluates JAX's own derivative (its jaxpr, translated like any other) instead of
    differentiating the translated forward graph with torch autograd: JAX's masking semantics (`where` selects
    the cotangent, so a NaN in a masked-off branch stays out) and custom_jvp rules hold by construction, and
    the result does not depend on which TorchScript executor or autodiff formulas the consumer runs.
    """
    def energy_and_forces(params: Any, *args: Any) -> tuple[Any, Any]:
        def total(x: Any) -> tuple[Any, Any]:
            first = jax.tree.leaves(fn(params, x, *args[1:]))[0]
            return jnp.sum(first), first

        (_, first), grad = jax.value_and_grad(total, has_aux=True)(args[0])
        return first, -grad

    return energy_and_forces


@dataclasses.dataclass(frozen=True)
class Bound:
    """One `dim_constraints` entry: `sym op value`."""

    sym: str
    op: str  # "<=" or ">="
    value: int

    @property
    def text(self) -> str:
        return f"{self.sym} {self.op} {self.value}"

    def allows(self, n: int) -> bool:
        return n <= self.value if self.op == "<=" else n >= self.value


def _parse_constraints(constraints: Sequence[str], axes: list[dict[int, str]]) -> list[Bound]:
    symbols = {s for spec in axes for s in spec.values()}
    bounds = []
    for text in constraints:
        m = re.fullmatch(r"\s*(\w+)\s*(<=|>=)\s*(\d+)\s*", text)
        if m is None or m[1] not in symbols:
            raise TrainkitError(f"dim_constraints entry {text!r} is not 'NAME <= N' or 'NAME >= N' for a dynamic axis "
                                f"name ({', '.join(sorted(symbols)) or 'there are no dynamic axes'})")
        bounds.append(Bound(m[1], m[2], int(m[3])))
    return bounds


def _input_names(input_names: Sequence[str] | None, n: int) -> list[str]:
    if input_names is None:
        return [f"x{i}" for i in range(n)]
    if len(input_names) != n:
        raise TrainkitError(f"input_names has {len(input_names)} names for {n} example arguments")
    names = []
    for raw in input_names:
        name = re.sub(r"\W", "_", str(raw))
        if not name.isidentifier() or keyword.iskeyword(name) or re.fullmatch(r"[a-z]+\d+|d_\w+|self|torch", name):
            name = f"in_{name}"
        names.append(name)
    if len(set(names)) != n:
        raise TrainkitError(f"input_names {list(input_names)} are not distinct identifiers")
    return names


def _normalize_axes(dynamic_axes: DynamicAxes | None, names: list[str], args: tuple) -> list[dict[int, str]]:
    if dynamic_axes is None:
        return [{} for _ in args]
    if isinstance(dynamic_axes, Mapping):
        unknown = set(dynamic_axes) - set(names)
        if unknown:
            raise TrainkitError(f"dynamic_axes names {sorted(unknown)} are not inputs; inputs are {names}")
        per_arg = [dynamic_axes.get(n) for n in names]
    else:
        per_arg = list(dynamic_axes)
        if len(per_arg) != len(args):
            raise TrainkitError(f"dynamic_axes has {len(per_arg)} entries for {len(args)} example arguments")
    axes = []
    for name, a, spec in zip(names, args, per_arg):
        spec = {int(k) % max(a.ndim, 1): str(v) for k, v in (spec or {}).items()}
        for k, sym in spec.items():
            if k >= a.ndim or not sym.isidentifier():
                raise TrainkitError(f"dynamic axis {k}: {sym!r} of input '{name}' (shape {a.shape}) is not a valid "
                                    "axis with an identifier name")
        axes.append(spec)
    return axes


def _trace(fn: Callable[..., Any], params: Any, args: tuple, axes: list[dict[int, str]],
           bounds: list[Bound]) -> tuple[Any, int]:
    """The jaxpr of `fn(params, *args)` with the dynamic axes symbolic, dead code removed (e.g. a constant PRNG
    key that flax's `nn.RNN` splits for an initializer it never calls), and its number of outputs."""
    try:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, *_specs(args, axes, bounds))
    except Exception as e:
        culprits = _dynamic_culprits(fn, params, args, axes, bounds)
        if not culprits:
            raise
        first = " ".join(str(e).split())
        first = first if len(first) < 200 else first[:197] + "..."
        bound = _suggested_bound(first)
        hint = f"if the model has such a bound, say so: dim_constraints=['{bound}']; else " if bound else ""
        raise TrainkitError(f"cannot trace the model with dynamic axis {' and '.join(map(repr, culprits))} ({first}); "
                            f"it traces with that axis static: {hint}leave it out of dynamic_axes (one module per "
                            "size) or avoid size-dependent Python logic") from None
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True)
    return core.ClosedJaxpr(jaxpr, closed.consts), len(jax.tree.leaves(out_shape))


def _suggested_bound(message: str) -> str | None:
    """The `dim_constraints` entry that a shape-polymorphism error asks for: `min(64, seq)` -> "seq <= 64",
    an inconclusive `'b' >= '2'` -> "b >= 2"."""
    m = re.search(r"min\((\d+), (\w+)\)|min\((\w+), (\d+)\)", message)
    if m:
        return f"{m[2] or m[3]} <= {m[1] or m[4]}"
    m = re.search(r"comparison '(\w+)' (>=|<=|>|<) '(\d+)'", message)
    if m:
        n = int(m[3])
        return {">=": f"{m[1]} >= {n}", ">": f"{m[1]} >= {n + 1}", "<=": f"{m[1]} <= {n}",
                "<": f"{m[1]} <= {n - 1}"}[m[2]]
    return None


def _specs(args: tuple, axes: list[dict[int, str]], bounds: list[Bound]) -> list[jax.ShapeDtypeStruct]:
    symbols = list(dict.fromkeys(s for spec in axes for s in spec.values()))
    constraints = [b.text for b in bounds if b.sym in symbols]
    dims = dict(zip(symbols, jax.export.symbolic_shape(", ".join(symbols), constraints=constraints))) if symbols else {}
    return [jax.ShapeDtypeStruct(tuple(dims[spec[i]] if i in spec else n for i, n in enumerate(a.shape)), a.dtype)
            for a, spec in zip(args, axes)]


def _dynamic_culprits(fn: Callable[..., Any], params: Any, args: tuple, axes: list[dict[int, str]],
                      bounds: list[Bound]) -> list[str]:
    """The dynamic axes that each alone make tracing fail, if `fn` traces with all axes static (else [])."""
    def traces(keep: set[str]) -> bool:
        try:
            kept = [{i: s for i, s in spec.items() if s in keep} for spec in axes]
            jax.make_jaxpr(fn)(params, *_specs(args, kept, bounds))
            return True
        except Exception:  # noqa: BLE001 (any failure counts: this only decides what the message blames)
            return False

    symbols = list(dict.fromkeys(s for spec in axes for s in spec.values()))
    if not symbols or not traces(set()):
        return []
    return [s for s in symbols if not traces({s})] or symbols


def _generate(closed: Any, params: Any, args: tuple, names: list[str], axes: list[dict[int, str]],
              bounds: list[Bound], n_outputs: int) -> tuple[str, dict[str, np.ndarray]]:
    em = Emitter(RULES, plan_fusions)
    param_codes = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "p_" + re.sub(r"\W+", "_", jax.tree_util.keystr(path)).strip("_")
        while name in em.buffers:
            name += "_"
        if is_key(leaf):  # e.g. an nnx module's Rngs state: a constant for the random rules (rules/random.py)
            param_codes.append(core.Literal(leaf, jax.typeof(leaf)))
            continue
        em.buffers[name] = np.asarray(leaf)
        param_codes.append(f"self.{name}")
        em.mark_no_grad(f"self.{name}")
    buffers = [f"self.{b}" for b in em.buffers]
    prologue = [f"_dev = {names[0]}.device" if names else f"_dev = {buffers[0]}.device"
                if buffers else "_dev = torch.device('cpu')"]
    checks = []
    for name, a, spec in zip(names, args, axes):
        checks.append(f"assert {name}.dim() == {a.ndim}, \"input '{name}' must have {a.ndim} dimensions\"")
        for i, n in enumerate(a.shape):
            sym = spec.get(i)
            if sym is None:
                checks.append(f"assert {name}.size({i}) == {n}, \"input '{name}' axis {i} must have size {n}\"")
            elif sym not in em.dim_vars:
                em.dim_vars[sym] = f"d_{sym}"
                prologue.append(f"d_{sym} = {name}.size({i})")
            else:
                checks.append(f"assert {name}.size({i}) == d_{sym}, \"input '{name}' axis {i} must equal "
                              f"dynamic size '{sym}'\"")
    checks += [f"assert d_{b.sym} {b.op} {b.value}, \"dynamic size '{b.sym}' must be {b.op} {b.value}\""
               for b in bounds]
    conversions = [f"{n} = {n}.to({em.dtype(a.dtype)})" for n, a in zip(names, args)]
    em.check_supported(closed.jaxpr)
    outs = [em.t(o) for o in em.run_closed(closed, param_codes + names)]
    indent = "        "
    body = [indent + line for line in prologue + checks + conversions]
    signature = ", ".join(f"{n}: torch.Tensor" for n in names)
    body += em.lines
    body.append(indent + (f"return {outs[0]}" if n_outputs == 1 else f"return ({', '.join(outs)},)"))
    returns = "torch.Tensor" if n_outputs == 1 else f"Tuple[{', '.join(['torch.Tensor'] * n_outputs)}]"
    source = "\n".join([
        "import torch", "from typing import List, Tuple", "", "",
        "class TrainkitExport(torch.nn.Module):",
        f"    def forward(self, {signature}) -> {returns}:", *body, ""])
    return source, em.buffers


def _script(source: str, buffers: dict[str, np.ndarray]) -> torch.jit.ScriptModule:
    global _script_count
    _script_count += 1
    filename = f"<trainkit-torchscript-{_script_count}>"
    # torch.jit.script reads the class source through inspect/linecache; register the generated text there.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {"__name__": _GENERATED_MODULE}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 (our own generated source)
    module = namespace["TrainkitExport"]()
    for name, value in buffers.items():
        module.register_buffer(name, _to_tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(module)
        except Exception as e:
            raise TrainkitError(f"TorchScript rejected the generated module ({str(e).strip().splitlines()[0]}); "
                                "this is a converter bug, please report it with the model") from e


def _to_tensor(value: np.ndarray) -> torch.Tensor:
    if value.dtype.name == "bfloat16":
        return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(value, copy=True))
