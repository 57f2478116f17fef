"""`to_torchscript` and `parity`: trace `fn` to a jaxpr with symbolic dimensions, translate it with an `Emitter`
over `registry.RULES` into the source of an `nn.Module.forward`, script it with the parameters as buffers, and
check it against JAX on the example inputs.
"""

from __future__ import annotations

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

from trainkit.errors import TrainkitError
from trainkit.export.torchscript.emitter import Emitter
from trainkit.export.torchscript.registry import RULES, plan_fusions

DynamicAxes = Sequence[Mapping[int, str] | None] | Mapping[str, Mapping[int, str]]
PARITY_TOLERANCE = 1e-4  # max_rel accepted at export; float32 translations land around 1e-6
_TINY = 1e-30
_GENERATED_MODULE = "trainkit_torchscript"
_script_count = 0


def to_torchscript(fn: Callable[..., Any], params: Any, example_args: Sequence[Any], path: str | None = None, *,
                   dynamic_axes: DynamicAxes | None = None, input_names: Sequence[str] | None = None,
                   output_names: Sequence[str] | None = None, with_forces: bool = False,
                   extra_files: Mapping[str, str] | None = None,
                   parity_tolerance: float | None = PARITY_TOLERANCE) -> torch.jit.ScriptModule:
    """Translate `fn(params, *args)` into a scripted module whose `forward(*args)` computes the same.

    dynamic_axes: per argument `{axis: "name"}` (a sequence aligned with `example_args`, `None` for a fully
      static argument) or a mapping from input name to such a dict; equal names must be equal sizes, e.g.
      `[{0: "batch", 1: "atoms"}, {0: "batch", 1: "atoms"}]` for positions and species.
    with_forces: `forward` returns `(output0, forces)`, forces = -∂ sum(output0) / ∂ args[0] (autograd inside
      TorchScript). Otherwise it returns what `fn` returns: one tensor, or a tuple of the flattened outputs.
    path: also `torch.jit.save` there, with `extra_files` (name -> text) embedded. The file needs only torch
      (Python or C++ libtorch); `torch.jit.load(path, map_location="cuda")` runs it on a GPU.

    Inputs are cast to the example dtypes (int64 token ids work); params become buffers in their own dtype.

    The measured `parity(...)` on `example_args` is attached as `module.parity`; an export whose max_rel
    exceeds `parity_tolerance` raises `TrainkitError`. `parity_tolerance=None` skips that check (and
    `module.parity` is None) for a caller that checks the module itself, on other inputs
    (`trainkit.export.pt`). `output_names` are recorded as `module.output_names`.
    """
    args = tuple(np.asarray(a) for a in example_args)
    names = _input_names(input_names, len(args))
    axes = _normalize_axes(dynamic_axes, names, args)
    if with_forces and (not args or not np.issubdtype(args[0].dtype, np.floating)):
        raise TrainkitError("with_forces=True differentiates with respect to the first input, which must be a "
                            "float array (e.g. positions)")
    closed, n_outputs = _trace(fn, params, args, axes)
    source, buffers = _generate(closed, params, args, names, axes, with_forces, n_outputs)
    module = _script(source, buffers)
    report = None if parity_tolerance is None else parity(fn, params, module, args, with_forces=with_forces)
    if report is not None and not report["max_rel"] <= parity_tolerance:
        raise TrainkitError(f"TorchScript export does not match JAX on the example inputs: max_rel="
                            f"{report['max_rel']:.3g}, max_abs={report['max_abs']:.3g} (tolerance "
                            f"{parity_tolerance:g}); this is a converter bug, please report it with the model")
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
           with_forces: bool = False) -> dict[str, float]:
    """Compare `module(*args)` with `fn(params, *args)` in JAX (and forces when `with_forces`).

    Returns `{"max_abs": ..., "max_rel": ...}` over all outputs, where for each output
    max_rel = max|torch - jax| / max(max|jax|, 1e-30): the error relative to the output's largest magnitude,
    so elements near zero do not blow it up. NaNs in the same places count as equal.
    """
    args = tuple(np.asarray(a) for a in args)

    def first_output_sum(x: jax.Array) -> jax.Array:
        return jnp.sum(jax.tree.leaves(fn(params, x, *args[1:]))[0])

    with jax.default_matmul_precision("highest"):  # a GPU default (TF32) would make a poor reference
        ref = jax.tree.leaves(jax.jit(fn)(params, *args))
        if with_forces:
            ref = [ref[0], -jax.jit(jax.grad(first_output_sum))(args[0])]
    device = next(iter(module.buffers()), torch.empty(0)).device
    out = module(*[torch.from_numpy(np.array(a, copy=True)).to(device) for a in args])
    got = [o.cpu() for o in ([out] if isinstance(out, torch.Tensor) else out)]
    if len(got) != len(ref):
        raise TrainkitError(f"the module returned {len(got)} outputs, JAX {len(ref)}")
    max_abs, max_rel = 0.0, 0.0
    for g, r in zip(got, ref):
        g = g.detach().to(torch.float64).numpy() if g.dtype != torch.bool else g.numpy().astype(np.float64)
        r = np.asarray(r, dtype=np.float64)
        if g.shape != r.shape:
            return {"max_abs": float("inf"), "max_rel": float("inf")}
        diff = np.where(np.isnan(g) & np.isnan(r), 0.0, np.abs(g - r))
        diff = np.where(np.isnan(diff), np.inf, diff)
        err = float(diff.max()) if diff.size else 0.0
        finite = np.abs(r[np.isfinite(r)])
        scale = max(float(finite.max()) if finite.size else 0.0, _TINY)
        max_abs, max_rel = max(max_abs, err), max(max_rel, err / scale)
    return {"max_abs": max_abs, "max_rel": max_rel}


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


def _trace(fn: Callable[..., Any], params: Any, args: tuple, axes: list[dict[int, str]]) -> tuple[Any, int]:
    symbols = list(dict.fromkeys(s for spec in axes for s in spec.values()))
    dims = dict(zip(symbols, jax.export.symbolic_shape(", ".join(symbols)))) if symbols else {}
    specs = [jax.ShapeDtypeStruct(tuple(dims[spec[i]] if i in spec else n for i, n in enumerate(a.shape)), a.dtype)
             for a, spec in zip(args, axes)]
    try:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, *specs)
    except Exception as e:  # shape-polymorphism failures name the operation; keep the user-facing line short
        if "symbolic" in str(e).lower() or "inconclusive" in type(e).__name__.lower():
            first = str(e).strip().splitlines()[0]
            raise TrainkitError(f"cannot trace the model with dynamic axes {symbols}: {first}; make that axis "
                                "static (leave it out of dynamic_axes) or avoid size-dependent Python logic") from e
        raise
    return closed, len(jax.tree.leaves(out_shape))


def _generate(closed: Any, params: Any, args: tuple, names: list[str], axes: list[dict[int, str]],
              with_forces: bool, n_outputs: int) -> tuple[str, dict[str, np.ndarray]]:
    em = Emitter(RULES, plan_fusions)
    param_codes = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "p_" + re.sub(r"\W+", "_", jax.tree_util.keystr(path)).strip("_")
        while name in em.buffers:
            name += "_"
        em.buffers[name] = np.asarray(leaf)
        param_codes.append(f"self.{name}")
        em.mark_no_grad(f"self.{name}")
    prologue = [f"_dev = {names[0]}.device" if names else f"_dev = {param_codes[0]}.device"
                if param_codes else "_dev = torch.device('cpu')"]
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
    conversions = [f"{n} = {n}.to({em.dtype(a.dtype)})" for n, a in zip(names, args)]
    if with_forces:
        conversions[0] += ".detach().requires_grad_(True)"
    em.check_supported(closed.jaxpr)
    outs = [em.t(o) for o in em.run_closed(closed, param_codes + names)]
    indent = "        "
    body = [indent + line for line in prologue + checks + conversions]
    signature = ", ".join(f"{n}: torch.Tensor" for n in names)
    if with_forces:
        body += [indent + "_grad_was_enabled = torch.is_grad_enabled()", indent + "torch.set_grad_enabled(True)"]
        body += em.lines
        body += [indent + line for line in (
            f"_grads = torch.autograd.grad([{outs[0]}.sum()], [{names[0]}], allow_unused=True)",
            "torch.set_grad_enabled(_grad_was_enabled)",
            "_g = _grads[0]",
            f"_forces = torch.zeros_like({names[0]}) if _g is None else -_g",
            f"return {outs[0]}.detach(), _forces")]
        returns = "Tuple[torch.Tensor, torch.Tensor]"
    else:
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
