"""Jaxpr → TorchScript source text: the `Emitter`, which names values and walks (nested) jaxprs, and the code-text
helpers that rules and fusions share.

`Emitter.run_jaxpr` walks a jaxpr and appends Python lines (TorchScript subset) to `Emitter.lines`. What a primitive
becomes is not known here: every equation goes through the one table passed in (`registry.RULES`: elementwise ops,
contractions, call primitives and control flow alike), and the fusion planner passed in (`registry.plan_fusions`)
picks the chains that become one native op. Values are either a code string naming a tensor (a local variable or
`self.<buffer>`) or a `core.Literal` (kept as a Python scalar where the torch op accepts one, so no tensor is
created per call).

The bottom layer of the package: it imports nothing from it, so every rule and fusion can import it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax._src import core, source_info_util

from trainkit.errors import TrainkitError

Value = Any  # str (tensor code) | core.Literal
Rule = Callable[["Emitter", core.JaxprEqn, list], list]  # (emitter, equation, input values) -> value per output
Emit = Callable[["Emitter", list[str]], str]  # (emitter, tensor codes of a chain's inputs) -> expression of its output

TORCH_DTYPES = {
    "float32": "torch.float32", "float64": "torch.float64", "float16": "torch.float16",
    "bfloat16": "torch.bfloat16", "int8": "torch.int8", "int16": "torch.int16", "int32": "torch.int32",
    "int64": "torch.int64", "uint8": "torch.uint8", "bool": "torch.bool",
}


NOT_CONSTANT = ("draws from a key that depends on the inputs, parameters or loop state; only constant keys are "
                "evaluated at export (pass random numbers in as an input, or make the model deterministic for export, "
                "e.g. deterministic=True / model.eval())")


class Unsupported(Exception):
    """Raised by a translation rule for a primitive/parameter combination it cannot express."""


@dataclass(frozen=True)
class Fusion:
    """A chain of equations that the emitter replaces by one expression (planned by the fusion matchers)."""

    inputs: tuple[core.Var, ...]
    covered: frozenset[int]  # equation indices replaced by the fused op (the root included)
    emit: Emit


Planner = Callable[[core.Jaxpr], dict[int, Fusion]]  # fusions of a jaxpr, keyed by the index of their root equation


def rule_table(*parts: Mapping[str, Rule]) -> dict[str, Rule]:
    """One table from several: a primitive named twice is an error, so each has exactly one translation."""
    table: dict[str, Rule] = {}
    for part in parts:
        for name, rule in part.items():
            if name in table:
                raise ValueError(f"primitive '{name}' has two translation rules: {_qualname(table[name])} and "
                                 f"{_qualname(rule)}; keep one")
            table[name] = rule
    return table


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def is_float(aval: Any) -> bool:
    return np.issubdtype(aval.dtype, np.inexact)


def is_key(aval: Any) -> bool:
    """A typed PRNG key (`jax.random.key`), which has no torch dtype."""
    return jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key)


class Emitter:
    """Accumulates the body of one TorchScript method.

    rules: primitive name -> translation, for every primitive (structural ones included); `registry.RULES`.
    plan: the chains of a jaxpr to emit as one native torch op (gelu, softmax, ...); `registry.plan_fusions`, or
      None to translate equation by equation.
    grad: where torch autograd and JAX's derivative differ (|x| at 0, clamp at its bounds, a masked NaN, a
      custom_jvp rule), the code that gives JAX's gradient is slower; `when_grad` picks. "runtime": both, chosen
      by `x.requires_grad` on each call (TorchScript); "exact": always JAX's (a graph traced once for autograd,
      torch.export); "none": never (a graph that is not differentiated: AOTInductor).
    """

    def __init__(self, rules: Mapping[str, Rule], plan: Planner | None = None, device: str = "_dev",
                 grad: str = "runtime"):
        self.rules = rules
        self.plan = plan
        self.grad = grad
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
        # State of the custom_jvp rule (rules/calls.py): it lives as long as one export, as this emitter does.
        self.jvp_nesting = 0  # JVP branches enclosing the equation being translated
        self.jvp_cache: dict[int, tuple] = {}  # id(custom_jvp_call equation) -> (JVP jaxpr, consts, zero tangents)
        self.control_flow: set[str] = set()  # what control flow became (rules/hops.py), for the sidecar
        self.nested = 0  # depth of the nested functions being emitted (rules/hops.py): literals become ops there

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
        if is_key(x.aval):
            raise Unsupported("uses a PRNG key as a number; only random draws from constant keys are exported")
        val = np.asarray(x.val, dtype=x.aval.dtype)
        if self.nested and val.ndim == 0:  # AOTInductor inlines a small buffer, and cannot pass one into a loop
            return self.assign(f"torch.full([], {py_scalar(val)}, dtype={self.dtype(val.dtype)}, device={self.device})")
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
        return self.grad != "none" and not isinstance(x, core.Literal) and x not in self._no_grad

    def when_grad(self, values: Sequence[Value], exact: str, fast: str) -> str:
        """`exact` where one of `values` may require grad, else `fast` (see `grad`)."""
        live = [x for x in values if self.needs_grad(x)]
        if not live:
            return fast
        if self.grad == "exact":
            return exact
        return f"{exact} if {' or '.join(f'{x}.requires_grad' for x in live)} else {fast}"

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
        fusions = self.plan(jaxpr) if self.plan is not None else {}
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
        """Translate one equation by its rule in the table (the only path); outputs are bound to locals."""
        name = eqn.primitive.name
        self._outer.append(eqn)
        try:
            if name in self.rules:
                outs = self.rules[name](self, eqn, ins)
            elif _foldable(eqn, [isinstance(x, core.Literal) for x in ins]):
                outs = evaluate(eqn, ins)
            else:
                raise Unsupported("is not supported")
            outs = [o if isinstance(o, core.Literal) else self.assign(o) for o in outs]
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

    def check_supported(self, jaxpr: core.Jaxpr, outer: tuple[core.JaxprEqn, ...] = (),
                        constant_inputs: Sequence[bool] = ()) -> None:
        """Fail before translating anything if any (nested) equation uses a primitive without a rule, unless its
        inputs are all constants (then it is evaluated at export: `evaluate`). `constant_inputs`: which of
        `jaxpr.invars` are constants (default none)."""
        missing: dict[str, tuple] = {}
        self._find_missing(jaxpr, outer, missing, list(constant_inputs) or [False] * len(jaxpr.invars))
        if missing:
            name, (eqn, chain, reason) = next(iter(missing.items()))
            others = sorted(set(missing) - {name})
            also = f" (also unsupported here: {', '.join(others)})" if others else ""
            self._where = [_label(e) for e in chain]
            raise TrainkitError(self._describe(eqn, f"{reason}{also}", chain))

    def _find_missing(self, jaxpr: core.Jaxpr, chain: tuple, missing: dict, constant_inputs: list[bool]) -> None:
        constant = {v for v, c in zip(jaxpr.invars, constant_inputs) if c}
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            flags = [isinstance(v, core.Literal) or v in constant for v in eqn.invars]
            if name in missing:
                pass
            elif name in CONSTANT_PRIMITIVES and not all(flags):
                missing[name] = (eqn, chain, NOT_CONSTANT)
            elif name not in self.rules and not _foldable(eqn, flags):
                missing[name] = (eqn, chain, "is not supported")
            for sub in core.jaxprs_in_params(eqn.params):
                inner = flags if len(flags) == len(sub.invars) else [False] * len(sub.invars)
                self._find_missing(sub, chain + (eqn,), missing, inner)
            if all(flags) and flags and (name not in self.rules or name in CONSTANT_PRIMITIVES):
                constant.update(eqn.outvars)

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


# Primitives translated only for constant inputs, into constants (rules/random.py); `check_supported` propagates
# constants through them and refuses them on other inputs.
CONSTANT_PRIMITIVES = frozenset({"random_seed", "random_split", "random_fold_in", "random_bits", "random_wrap",
                             "random_unwrap", "threefry2x32"})
_MAX_FOLDED_ELEMENTS = 1 << 20


def _foldable(eqn: core.JaxprEqn, constant: list[bool]) -> bool:
    """A primitive without a rule can still be exported when all its inputs are constants (bits drawn from a
    constant key, shifted and scaled into floats): JAX evaluates it at export and its value is embedded."""
    return (bool(constant) and all(constant) and not core.jaxprs_in_params(eqn.params)
            and all(isinstance(d, (int, np.integer)) for v in eqn.outvars for d in v.aval.shape)
            and sum(math.prod(v.aval.shape) for v in eqn.outvars) <= _MAX_FOLDED_ELEMENTS)


def evaluate(eqn: core.JaxprEqn, ins: list[core.Literal]) -> list[core.Literal]:
    """The equation evaluated by JAX on constant inputs, as constants (PRNG keys stay keys)."""
    outs = eqn.primitive.bind(*[x.val for x in ins], **eqn.params)
    outs = outs if eqn.primitive.multiple_results else [outs]
    return [core.Literal(o if is_key(v.aval) else np.asarray(o), v.aval) for o, v in zip(outs, eqn.outvars)]


def _label(eqn: core.JaxprEqn) -> str:
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    name = eqn.params.get("name") or getattr(getattr(getattr(sub, "jaxpr", sub), "debug_info", None), "func_name", "")
    return f"{eqn.primitive.name} '{name}'" if name else eqn.primitive.name


# ---- code text shared by rules and fusions ----------------------------------------------------------------
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


def int_list(axes: Any) -> str:
    """Integers as a Python list literal (`[0, 2]`)."""
    return "[" + ", ".join(str(int(a)) for a in axes) + "]"


def torch_pad(pairs: list[tuple[str, str]]) -> str:
    """Per-dim (low, high) padding codes as the argument of `torch.constant_pad_nd` (last dim first)."""
    return "[" + ", ".join(f"{lo}, {hi}" for lo, hi in reversed(pairs)) + "]"


def same_dim(a: Any, b: Any) -> bool:
    """Two dimensions known to be equal (symbolic ones that may differ are not)."""
    try:
        return bool(a == b)
    except core.InconclusiveDimensionOperation:
        return False


def placed(vec: str, axis: int, rank: int) -> str:
    """A 1-d tensor as axis `axis` of a rank-`rank` tensor (a view; `[None, :]` would record slices)."""
    if rank == 1:
        return vec
    return f"{vec}.reshape([{', '.join('-1' if a == axis else '1' for a in range(rank))}])"
