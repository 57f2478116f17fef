"""Tracing for `to_torchscript`: `fn(params, *args)` to a jaxpr with the dynamic axes symbolic (and bounded by
`dim_constraints`), dead code removed; `with_jax_forces` makes JAX's own derivative part of the function, and a
tracing failure that only a dynamic axis causes becomes one line naming that axis and the bound it needs."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import core
from jax._src.interpreters import partial_eval as pe

from trainkit.errors import TrainkitError


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


def parse_constraints(constraints: Sequence[str], axes: list[dict[int, str]]) -> list[Bound]:
    symbols = {s for spec in axes for s in spec.values()}
    bounds = []
    for text in constraints:
        m = re.fullmatch(r"\s*(\w+)\s*(<=|>=)\s*(\d+)\s*", text)
        if m is None or m[1] not in symbols:
            raise TrainkitError(f"dim_constraints entry {text!r} is not 'NAME <= N' or 'NAME >= N' for a dynamic axis "
                                f"name ({', '.join(sorted(symbols)) or 'there are no dynamic axes'})")
        bounds.append(Bound(m[1], m[2], int(m[3])))
    return bounds


def trace(fn: Callable[..., Any], params: Any, args: tuple, axes: list[dict[int, str]],
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
