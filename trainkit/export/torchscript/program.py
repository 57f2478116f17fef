"""`to_torch_export`: the translation `to_torchscript` makes (the same tracing and rules), emitted for
`torch.export` instead: a `.pt2` ExportedProgram, or, compiled by AOTInductor, a package of fused C++ kernels.

What differs from TorchScript's emission, and why:
- control flow becomes torch's higher-order ops (`rules/hops.py`): a Python loop or branch would be traced once,
  for the example's trip count and branch;
- no fusions: they exist for the TorchScript interpreter's per-op cost (and some are in-place or chunked, which
  torch.export would specialize to the example's sizes); Inductor fuses what it compiles itself;
- gradients: a `.pt2` is traced once for all callers, so it always carries the code that gives JAX's gradient
  where torch autograd would differ (`Emitter.grad == "exact"`); an AOTInductor package has no autograd, so it
  never does ("none"), and forces are JAX's derivative translated into the graph (`with_forces`), as for `.pt`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from trainkit.errors import TrainkitError
from trainkit.export.runtime import CPU_FLAGS, DIMS, INPUTS, cpu_flags, load_package
from trainkit.export.torchscript.api import DynamicAxes, instantiate, translate
from trainkit.export.torchscript.checks import checked_parity, to_tensor, tolerance
from trainkit.export.torchscript.emitter import Emitter
from trainkit.export.torchscript.registry import EXPORT_RULES
from trainkit.export.torchscript.tracing import Bound


@dataclasses.dataclass
class TorchExport:
    """What `to_torch_export` made: call it like the model (`export(*inputs)`)."""

    program: torch.export.ExportedProgram
    run: Callable[..., Any]  # the program's module, or the loaded AOTInductor package
    input_names: list[str]
    output_names: list[str] | None
    dims: dict[str, dict[str, int | None]]  # dynamic dimension name -> {"min": ..., "max": ...}
    control_flow: list[str]  # the higher-order ops in the graph (torch.cond, while_loop, scan), or "unrolled"
    parity: dict[str, Any] | None = None
    package: str | None = None  # the AOTInductor package (compile=True)
    target: dict[str, str] | None = None  # what the package was compiled for (torch's AOTI_* metadata)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self.run(*inputs)


def to_torch_export(fn: Callable[..., Any], params: Any, example_args: Sequence[Any], path: str | None = None, *,
                    dynamic_axes: DynamicAxes | None = None, input_names: Sequence[str] | None = None,
                    output_names: Sequence[str] | None = None, with_forces: bool = False,
                    dim_constraints: Sequence[str] = (), parity_tolerance: float | str | None = "auto",
                    compile: bool = False, extra_files: Mapping[str, str] | None = None) -> TorchExport:
    """Translate `fn(params, *args)` into a `torch.export` program whose `forward(*args)` computes the same.

    The arguments are `to_torchscript`'s. Dynamic axes become `torch.export.Dim`s of the same names, bounded
    by `dim_constraints`. `path`: also write it there: `torch.export.save` (load with `torch.export.load(path)
    .module()`, torch only), with `extra_files` embedded. `compile=True`: compile the program with AOTInductor
    for this machine into the package `path` (a `.pt2` name; load with `torch._inductor.aoti_load_package`
    or `trainkit.export.runtime.load_package`, or from C++), with `extra_files` as package metadata; the
    returned export runs the package.

    Checked like `to_torchscript` (parity with JAX at two sizes, `REPEAT_CALLS` calls each): on the program's
    module, or on the compiled package.
    """
    em = Emitter(EXPORT_RULES, None, grad="none" if compile else "exact")
    t = translate(fn, params, example_args, dynamic_axes=dynamic_axes, input_names=input_names,
                  with_forces=with_forces, dim_constraints=dim_constraints, em=em)
    dims = _dims(t.axes, t.bounds)
    shapes = {n: {i: dims[s] for i, s in spec.items()} or None for n, spec in zip(t.names, t.axes)}
    module = instantiate(t.source, t.buffers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(module, tuple(to_tensor(a) for a in t.args), dynamic_shapes=shapes)
        except Exception as e:
            raise TrainkitError(f"torch.export rejected the translated module ({_first_line(e)}); this is a "
                                "converter bug, please report it with the model") from e
    export = TorchExport(program, program.module(), list(t.names), list(output_names) if output_names else None,
                         {name: {"min": _finite(d.min), "max": _finite(d.max)} for name, d in dims.items()},
                         sorted(em.control_flow))
    extra = dict(extra_files or {})
    if compile:
        signature = [{"name": n, "shape": [spec.get(i, d) for i, d in enumerate(a.shape)], "dtype": a.dtype.name}
                     for n, a, spec in zip(t.names, t.args, t.axes)]
        extra.update({INPUTS: json.dumps(signature), DIMS: json.dumps(export.dims)})
        export.package = _compile(program, path, extra)
        runner = load_package(export.package)
        export.run, export.target = runner, {k: v for k, v in runner.get_metadata().items() if k.startswith("AOTI_")}
    if parity_tolerance == "auto":
        parity_tolerance = tolerance(t.args, t.closed)
    if parity_tolerance is not None:
        try:
            export.parity = checked_parity(fn, params, export.run, t.args, t.axes, t.bounds, with_forces,
                                           parity_tolerance, "AOTInductor" if compile else "torch.export")
        except TrainkitError:
            if export.package is not None and path is not None:  # a wrong package is not left behind
                os.unlink(export.package)
            raise
    if path is not None and not compile:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.export.save(program, path, extra_files=extra)
    return export


def _compile(program: torch.export.ExportedProgram, path: str | None, metadata: dict[str, str]) -> str:
    if path is not None:
        if not str(path).endswith(".pt2"):
            raise TrainkitError(f"an AOTInductor package is a .pt2 file; name it e.g. model.aoti.pt2, not {path}")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 (torch raises a RuntimeError or an InvalidCxxCompiler)
        raise TrainkitError(f"an AOTInductor package is compiled C++ and there is no C++ compiler here "
                            f"({_first_line(e)}); install g++ or clang++, or set CXX") from None
    # -march=native (torch's default) may use any extension of this CPU: record them (runtime.check_target)
    native = torch._inductor.config.cpp.march is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch._inductor.aoti_compile_and_package(
                program, package_path=None if path is None else os.fspath(path), inductor_configs={
                    "aot_inductor.metadata": {**metadata, CPU_FLAGS: " ".join(sorted(cpu_flags())) if native else ""},
                    # with AOTI_RUNTIME_CHECK_INPUTS=1 (the C++ example), sizes of 1 pass, as in JAX and the .pt2
                    "aot_inductor.check_lowerbound": False,
                    # Inductor inlines small weights as constants, and cannot lower a loop that takes one
                    "always_keep_tensor_constants": True,
                })
        except Exception as e:
            raise TrainkitError(f"AOTInductor could not compile the program ({_first_line(e)}); this is a "
                                "converter bug, please report it with the model") from e


def _dims(axes: list[dict[int, str]], bounds: list[Bound]) -> dict[str, Any]:
    """One `torch.export.Dim` per dynamic axis name, within its bounds (JAX's symbolic sizes are >= 1)."""
    dims = {}
    for sym in dict.fromkeys(s for spec in axes for s in spec.values()):
        lo = max([1] + [b.value for b in bounds if b.sym == sym and b.op == ">="])
        hi = min([b.value for b in bounds if b.sym == sym and b.op == "<="], default=None)
        dims[sym] = torch.export.Dim(sym, min=lo, **({} if hi is None else {"max": hi}))
    return dims


def _finite(n: Any) -> int | None:
    return int(n) if isinstance(n, int) and n < 2**62 else None


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
