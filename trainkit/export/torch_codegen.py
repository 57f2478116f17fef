"""Jaxpr → TorchScript source text: names values, inlines sub-jaxprs, emits control flow and custom_jvp.

`Emitter.run_jaxpr` walks a jaxpr and appends Python lines (TorchScript subset) to `Emitter.lines`; the
per-primitive translations live in `torch_ops*` (registered in `torch_ops.RULES`), control flow in
`torch_control_flow`, native-op fusion in `torch_fusion`. Values are either a code string naming a tensor (a
local variable or `self.<buffer>`) or a `core.Literal` (kept as a Python scalar where the torch op accepts one,
so no tensor is created per call).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from jax._src import core, source_info_util

from trainkit.errors import TrainkitError
from trainkit.export import torch_control_flow, torch_fusion

Value = Any  # str (tensor code) | core.Literal
Rule = Callable[["Emitter", core.JaxprEqn, list], list]

# Primitives whose only job is to call a sub-jaxpr; they are inlined.
CALL_PRIMITIVES = {"jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_lin",
                   "custom_vjp_call", "custom_vjp_call_jaxpr"}
# custom_jvp functions from JAX itself whose torch-native op has the same value and the same gradient.
NATIVE_CUSTOM_JVP = {
    "relu": lambda x: f"torch.relu({x[0]})",
    "relu6": lambda x: f"torch.nn.functional.hardtanh({x[0]}, 0.0, 6.0)",
    "logaddexp": lambda x: f"torch.logaddexp({x[0]}, {x[1]})",
}
STRUCTURAL = CALL_PRIMITIVES | {"custom_jvp_call", "cond", "while", "scan"}  # translated here, not by rules
_MAX_JVP_NESTING = 4

TORCH_DTYPES = {
    "float32": "torch.float32", "float64": "torch.float64", "float16": "torch.float16",
    "bfloat16": "torch.bfloat16", "int8": "torch.int8", "int16": "torch.int16", "int32": "torch.int32",
    "int64": "torch.int64", "uint8": "torch.uint8", "bool": "torch.bool",
}


class Unsupported(Exception):
    """Raised by a translation rule for a primitive/parameter combination it cannot express."""


def is_float(aval: Any) -> bool:
    return np.issubdtype(aval.dtype, np.inexact)


class Emitter:
    """Accumulates the body of one TorchScript method; `rules` maps primitive names to translations."""

    def __init__(self, rules: dict[str, Rule], device: str = "_dev", fuse: bool = True):
        self.rules = rules
        self.fuse = fuse  # map jax.nn chains (gelu, softmax, ...) to native torch ops
        self.device = device
        self.lines: list[str] = []
        self.buffers: dict[str, np.ndarray] = {}
        self.dim_vars: dict[str, str] = {}  # symbolic dimension name -> local variable holding its size
        self.fills: dict[str, core.Literal] = {}  # locals known to be `torch.full(shape, literal)`
        self._indent = 2
        self._counter = itertools.count()
        self._literal_buffers: dict[tuple, str] = {}
        self._const_ids: dict[int, str] = {}
        self._no_grad: set[str] = set()  # values known never to require grad (buffers, detached, integers)
        self._where: list[str] = []
        self._outer: list[core.JaxprEqn] = []  # equations being translated, innermost last
        self._jvp_nesting = 0
        self._jvp_cache: dict[int, tuple] = {}

    # ---- text -------------------------------------------------------------------------------------------
    def fresh(self, prefix: str = "t") -> str:
        return f"{prefix}{next(self._counter)}"

    def emit(self, line: str) -> None:
        self.lines.append("    " * self._indent + line)

    @contextlib.contextmanager
    def block(self, header: str) -> Iterator[None]:
        self.emit(header)
        self._indent += 1
        start = len(self.lines)
        yield
        if len(self.lines) == start:
            self.emit("pass")
        self._indent -= 1

    def assign(self, expr: str, prefix: str = "t") -> str:
        """Bind `expr` to a fresh local and return its name (names and `self.x` are returned as is)."""
        if expr.isidentifier() or (expr.startswith("self.") and expr[5:].isidentifier()):
            return expr
        name = self.fresh(prefix)
        self.emit(f"{name} = {expr}")
        return name

    # ---- values -----------------------------------------------------------------------------------------
    def dim(self, d: Any) -> str:
        """Python code for one dimension: an int, or a symbolic expression over the input sizes."""
        if isinstance(d, (int, np.integer)):
            return str(int(d))
        return _dim_code(d, self.dim_vars)

    def shape(self, shape: Sequence[Any]) -> str:
        return "[" + ", ".join(self.dim(d) for d in shape) + "]"

    @staticmethod
    def dtype(dtype: Any) -> str:
        name = np.dtype(dtype).name
        if name not in TORCH_DTYPES:
            raise Unsupported(f"dtype {name} has no TorchScript equivalent")
        return TORCH_DTYPES[name]

    @staticmethod
    def scalar(lit: core.Literal) -> str:
        return py_scalar(lit.val)

    def s(self, x: Value) -> str:
        """A value where the torch op accepts a Python scalar or a tensor."""
        return self.scalar(x) if isinstance(x, core.Literal) else x

    def t(self, x: Value) -> str:
        """A value as a tensor; literals become 0-d buffers (registered once, moved with `.to(device)`)."""
        if not isinstance(x, core.Literal):
            return x
        val = np.asarray(x.val, dtype=x.aval.dtype)
        key = (val.dtype.str, val.tobytes())
        if key not in self._literal_buffers:
            name = f"k{len(self._literal_buffers)}"
            self._literal_buffers[key] = f"self.{name}"
            self.buffers[name] = val
            self._no_grad.add(f"self.{name}")
        return self._literal_buffers[key]

    def const(self, value: Any) -> str:
        """A closed-over constant array as a buffer (deduplicated by identity)."""
        if id(value) not in self._const_ids:
            name = f"c{len(self._const_ids)}"
            self.buffers[name] = np.asarray(value)
            self._const_ids[id(value)] = f"self.{name}"
            self._no_grad.add(f"self.{name}")
        return self._const_ids[id(value)]

    def mark_no_grad(self, name: str) -> None:
        self._no_grad.add(name)

    def needs_grad(self, x: Value) -> bool:
        return not isinstance(x, core.Literal) and x not in self._no_grad

    # ---- jaxprs -----------------------------------------------------------------------------------------
    def run_closed(self, closed: Any, args: list[Value]) -> list[Value]:
        if isinstance(closed, core.ClosedJaxpr):
            return self.run_jaxpr(closed.jaxpr, [self.const(c) for c in closed.consts], args)
        return self.run_jaxpr(closed, [], args)

    def run_jaxpr(self, jaxpr: core.Jaxpr, consts: list[Value], args: list[Value]) -> list[Value]:
        env: dict[core.Var, Value] = {}

        def read(a: Any) -> Value:
            return a if isinstance(a, core.Literal) else env[a]

        env.update(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        fusions = torch_fusion.plan(jaxpr) if self.fuse else {}
        fused = {i for f in fusions.values() for i in f.covered}
        for i, eqn in enumerate(jaxpr.eqns):
            if i in fusions:
                ins = [read(v) for v in fusions[i].inputs]
                out = self.assign(fusions[i].emit(self, [self.t(x) for x in ins]))
                if not any(self.needs_grad(x) for x in ins):
                    self._no_grad.add(out)
                env[eqn.outvars[0]] = out
            elif i not in fused:
                env.update(zip(eqn.outvars, self.eqn(eqn, [read(a) for a in eqn.invars])))
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
        name = eqn.primitive.name
        self._outer.append(eqn)
        try:
            if name in CALL_PRIMITIVES:
                outs = self._call(eqn, ins)
            elif name == "custom_jvp_call":
                outs = self._custom_jvp(eqn, ins)
            elif name in torch_control_flow.EMITTERS:
                outs = torch_control_flow.EMITTERS[name](self, eqn, ins)
            elif name in self.rules:
                outs = [o if isinstance(o, core.Literal) else self.assign(o)
                        for o in self.rules[name](self, eqn, ins)]
            else:
                raise Unsupported("is not supported")
        except Unsupported as e:
            raise TrainkitError(self._describe(eqn, str(e))) from None
        finally:
            self._outer.pop()
        if all(not self.needs_grad(x) for x in ins) or name == "stop_gradient":
            self._no_grad.update(o for o in outs if isinstance(o, str))
        for v, o in zip(eqn.outvars, outs):
            if isinstance(o, str) and not is_float(v.aval):
                self._no_grad.add(o)
        return outs

    def check_supported(self, jaxpr: core.Jaxpr, outer: tuple[core.JaxprEqn, ...] = ()) -> None:
        """Fail before translating anything if any (nested) equation uses a primitive without a rule."""
        missing: dict[str, tuple] = {}
        self._find_missing(jaxpr, outer, missing)
        if missing:
            name, (eqn, chain) = next(iter(missing.items()))
            others = sorted(set(missing) - {name})
            also = f" (also unsupported here: {', '.join(others)})" if others else ""
            self._where = [_label(e) for e in chain]
            raise TrainkitError(self._describe(eqn, f"is not supported{also}", chain))

    def _find_missing(self, jaxpr: core.Jaxpr, chain: tuple, missing: dict) -> None:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name not in self.rules and name not in STRUCTURAL and name not in missing:
                missing[name] = (eqn, chain)
            for sub in core.jaxprs_in_params(eqn.params):
                self._find_missing(sub, chain + (eqn,), missing)

    def _describe(self, eqn: core.JaxprEqn, reason: str, chain: tuple = ()) -> str:
        where = ""
        for e in (eqn, *reversed(chain), *reversed(self._outer)):
            where = source_info_util.summarize(e.source_info)
            if where:
                break
        inside = "".join(f" inside {w}" for w in reversed(self._where))
        text = " ".join(str(eqn).split())
        text = text if len(text) < 160 else text[:157] + "..."
        return (f"cannot export to TorchScript: primitive '{eqn.primitive.name}' (at {where}{inside}) {reason}; "
                f"equation: `{text}`. Rewrite that part of the model with supported operations, or compute it "
                f"outside the exported function")

    @contextlib.contextmanager
    def inside(self, what: str) -> Iterator[None]:
        self._where.append(what)
        try:
            yield
        finally:
            self._where.pop()

    def materialize(self, outs: list[Value]) -> list[str]:
        """Values as tensors: loop carries and branch results must be tensors in every path."""
        return [self.t(o) for o in outs]

    def _call(self, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
        params = eqn.params
        sub = params.get("jaxpr", params.get("call_jaxpr", params.get("fun_jaxpr")))
        label = params.get("name", getattr(getattr(sub, "jaxpr", sub).debug_info, "func_name", ""))
        if eqn.primitive.name.startswith("custom_vjp"):
            warnings.warn(f"custom_vjp function '{label}' is exported as its primal computation: torch autograd "
                          "differentiates the primal, not the custom backward rule", stacklevel=2)
        with self.inside(f"{eqn.primitive.name} '{label}'"):
            return self.run_closed(sub, ins)

    # ---- custom_jvp: value from the primal, gradient from the custom JVP rule ---------------------------
    def _custom_jvp(self, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
        call = eqn.params["call_jaxpr"]
        jvp_fun = eqn.params["jvp_jaxpr_fun"]
        label = call.jaxpr.debug_info.func_name
        from_jax = "jax/_src/" in str(getattr(jvp_fun.debug_info, "func_src_info", ""))
        nconsts = eqn.params["num_consts"]
        primals = ins[nconsts:]
        with self.inside(f"custom_jvp_call '{label}'"):
            if from_jax and label in NATIVE_CUSTOM_JVP and len(eqn.outvars) == 1:
                return [self.assign(NATIVE_CUSTOM_JVP[label]([self.t(x) for x in primals]))]
            diff = [i for i, v in enumerate(eqn.invars[nconsts:]) if is_float(v.aval)]
            live = [primals[i] for i in diff if self.needs_grad(primals[i])]
            if not live or self._jvp_nesting >= _MAX_JVP_NESTING:
                return self.run_closed(call, ins)
            results = [self.fresh("r") for _ in eqn.outvars]
            with self.block(f"if {' or '.join(f'{x}.requires_grad' for x in live)}:"):
                self._emit_jvp_branch(eqn, jvp_fun, primals, diff, results)
            with self.block("else:"):
                outs = self.materialize(self.run_closed(call, ins))
                self.emit(f"{', '.join(results)}, = ({', '.join(outs)},)")
            return list(results)

    def _emit_jvp_branch(self, eqn: core.JaxprEqn, jvp_fun: Any, primals: list[Value], diff: list[int],
                         results: list[str]) -> None:
        """out = primal(x̄) + (T - T.detach()) with T = JVP(x̄, x - x̄): value of the primal, gradient Jᵀ·g."""
        key = id(eqn)
        if key not in self._jvp_cache:
            zeros = [i not in diff for i in range(len(primals))]
            self._jvp_cache[key] = jvp_fun.call_wrapped(*zeros)
        jvp_jaxpr, jvp_consts, out_zeros = self._jvp_cache[key]
        detached, tangents = list(primals), []
        for i in diff:
            x = self.t(primals[i])
            detached[i] = self.assign(f"{x}.detach()")
            self.mark_no_grad(detached[i])
            tangents.append(self.assign(f"{x} - {detached[i]}"))
        self._jvp_nesting += 1
        try:
            outs = self.run_jaxpr(jvp_jaxpr, [self.const(c) for c in jvp_consts], detached + tangents)
        finally:
            self._jvp_nesting -= 1
        primal_outs, tangent_outs = outs[:len(out_zeros)], iter(outs[len(out_zeros):])
        final = []
        for p, zero, v in zip(primal_outs, out_zeros, eqn.outvars):
            p = self.t(p)
            if zero or not is_float(v.aval):
                final.append(p)
                continue
            tan = self.t(next(tangent_outs))
            final.append(f"{p} + torch.nan_to_num({tan} - {tan}.detach(), 0.0, 0.0, 0.0)")
        self.emit(f"{', '.join(results)}, = ({', '.join(final)},)")


def _label(eqn: core.JaxprEqn) -> str:
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    name = eqn.params.get("name") or getattr(getattr(getattr(sub, "jaxpr", sub), "debug_info", None), "func_name", "")
    return f"{eqn.primitive.name} '{name}'" if name else eqn.primitive.name


def py_scalar(value: Any) -> str:
    """A scalar as Python source (`float("inf")`, `(-1.0)`, `True`, `3`)."""
    val = np.asarray(value)
    if val.shape != ():
        raise Unsupported("non-scalar literal")
    if val.dtype == np.bool_:
        return str(bool(val))
    if np.issubdtype(val.dtype, np.integer):
        return str(int(val))
    f = float(val)
    if math.isnan(f):
        return 'float("nan")'
    if math.isinf(f):
        return 'float("inf")' if f > 0 else 'float("-inf")'
    return f"({f!r})" if f < 0 else repr(f)


def _dim_code(d: Any, dim_vars: dict[str, str]) -> str:
    """Python source for a `jax.export` symbolic dimension expression (sum of products of factors)."""
    terms = []
    for term, coeff in d._sorted_terms:
        factors = []
        for factor, power in term._factors:
            if factor.var is not None:
                if factor.var not in dim_vars:
                    raise Unsupported(f"symbolic dimension '{factor.var}' is not the size of an input axis")
                code = dim_vars[factor.var]
            else:
                a, b = (_dim_code(o, dim_vars) if not isinstance(o, int) else str(o) for o in factor.operands)
                code = {"floordiv": f"({a} // {b})", "mod": f"({a} % {b})",
                        "max": f"max({a}, {b})", "min": f"min({a}, {b})"}[factor.operation]
            factors.extend([code] * power)
        body = " * ".join(factors) if factors else "1"
        terms.append(body if coeff == 1 else (str(coeff) if not factors else f"{coeff} * {body}"))
    return "(" + " + ".join(terms) + ")" if len(terms) > 1 else terms[0]
