"""`to_torchscript`: trace `fn` to a jaxpr with symbolic dimensions (`tracing`), translate it with an `Emitter` over
`registry.RULES` into the source of an `nn.Module.forward`, script it with the parameters as buffers, and check it
against JAX (`checks`).
"""

from __future__ import annotations

import dataclasses
import keyword
import linecache
import os
import re
import sys
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import torch
from jax._src import core

from trainkit.errors import TrainkitError
from trainkit.export.torchscript.checks import checked_parity, to_tensor, tolerance
from trainkit.export.torchscript.emitter import Emitter, is_key
from trainkit.export.torchscript.registry import RULES, plan_fusions
from trainkit.export.torchscript.tracing import Bound, parse_constraints, trace, with_jax_forces

DynamicAxes = Sequence[Mapping[int, str] | None] | Mapping[str, Mapping[int, str]]
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
    t = translate(fn, params, example_args, dynamic_axes=dynamic_axes, input_names=input_names,
                  with_forces=with_forces, dim_constraints=dim_constraints)
    args, names, axes, bounds, closed = t.args, t.names, t.axes, t.bounds, t.closed
    module = _script(t.source, t.buffers)
    report = None
    if parity_tolerance == "auto":
        parity_tolerance = tolerance(args, closed)
    if parity_tolerance is not None:
        report = checked_parity(fn, params, module, args, axes, bounds, with_forces, parity_tolerance)
    module.parity = report
    module.input_names = list(names)
    module.output_names = list(output_names) if output_names else None
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(module, path, _extra_files=dict(extra_files or {}))
    return module


@dataclasses.dataclass(frozen=True)
class Translation:
    """`fn` traced and translated: the generated source and buffers, and what they were made from."""

    args: tuple[np.ndarray, ...]
    names: list[str]
    axes: list[dict[int, str]]
    bounds: list[Bound]
    closed: core.ClosedJaxpr
    source: str
    buffers: dict[str, np.ndarray]


def translate(fn: Callable[..., Any], params: Any, example_args: Sequence[Any], *,
              dynamic_axes: DynamicAxes | None = None, input_names: Sequence[str] | None = None,
              with_forces: bool = False, dim_constraints: Sequence[str] = (),
              em: Emitter | None = None) -> Translation:
    """Trace `fn(params, *example_args)` with its dynamic axes and translate it with `em` (TorchScript's
    emitter by default); see `to_torchscript` for the arguments."""
    args = tuple(np.asarray(a) for a in example_args)
    names = _input_names(input_names, len(args))
    axes = _normalize_axes(dynamic_axes, names, args)
    bounds = parse_constraints(dim_constraints, axes)
    if with_forces and (not args or not np.issubdtype(args[0].dtype, np.floating)):
        raise TrainkitError("with_forces=True differentiates with respect to the first input, which must be a "
                            "float array (e.g. positions)")
    closed, n_outputs = trace(with_jax_forces(fn) if with_forces else fn, params, args, axes, bounds)
    try:
        source, buffers = _generate(closed, params, args, names, axes, bounds, n_outputs, em)
    except TrainkitError as e:
        missing = re.search(r"primitive '([^']+)'", str(e))
        if not with_forces or missing is None or missing[1] in _primitives(trace(fn, params, args, axes, bounds)[0]):
            raise
        raise TrainkitError(f"{e} (it is in JAX's derivative of the model, which with_forces=True translates: "
                            "export without with_forces and differentiate the module with torch autograd, or "
                            "avoid the operation whose derivative needs it)") from None
    return Translation(args, names, axes, bounds, closed, source, buffers)


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


def _generate(closed: Any, params: Any, args: tuple, names: list[str], axes: list[dict[int, str]],
              bounds: list[Bound], n_outputs: int, em: Emitter | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """The source of `TrainkitExport.forward` and its buffers; `em`: the emitter (TorchScript's by default)."""
    em = em or Emitter(RULES, plan_fusions)
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


def instantiate(source: str, buffers: dict[str, np.ndarray]) -> torch.nn.Module:
    """The generated module, eager, with its buffers."""
    global _script_count
    _script_count += 1
    filename = f"<trainkit-torchscript-{_script_count}>"
    # torch.jit.script and torch.export read the source through inspect/linecache; register the text there.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    generated = types.ModuleType(_GENERATED_MODULE)  # torch.export's tracer of nested functions imports it
    generated.__file__ = filename
    sys.modules[_GENERATED_MODULE] = generated
    exec(compile(source, filename, "exec"), generated.__dict__)  # noqa: S102 (our own generated source)
    module = generated.TrainkitExport()
    for name, value in buffers.items():
        module.register_buffer(name, to_tensor(value))
    return module


def _script(source: str, buffers: dict[str, np.ndarray]) -> torch.jit.ScriptModule:
    module = instantiate(source, buffers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(module)
        except Exception as e:
            raise TrainkitError(f"TorchScript rejected the generated module ({str(e).strip().splitlines()[0]}); "
                                "this is a converter bug, please report it with the model") from e
