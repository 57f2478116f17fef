"""What fusion matchers read: `Graph`, a jaxpr's producers and use counts, and `plan`, which runs the matchers
over a jaxpr in passes (the passes themselves are listed in `registry.FUSION_PASSES`).

A matcher gets the graph and a candidate root (the last equation of a chain) and returns None or
`(inputs, chain, emit)`: the chain's input variables, its equations (root included), and `emit(g, input codes)`,
the expression of the root's output.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from jax._src import core

from trainkit.export.torchscript.emitter import Fusion


class Graph:
    """A jaxpr's equations by the variables they produce, and how often each variable is used."""

    def __init__(self, jaxpr: core.Jaxpr):
        self.index = {id(eqn): i for i, eqn in enumerate(jaxpr.eqns)}
        self.producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
        self.uses = Counter(v for eqn in jaxpr.eqns for v in eqn.invars if isinstance(v, core.Var))
        self.uses.update(v for v in jaxpr.outvars if isinstance(v, core.Var))

    def op(self, v: object, name: str) -> core.JaxprEqn | None:
        eqn = self.producer.get(v) if isinstance(v, core.Var) else None
        return eqn if eqn is not None and eqn.primitive.name == name else None


def literal_is(x: object, value: float) -> bool:
    return isinstance(x, core.Literal) and np.shape(x.val) == () and np.isclose(float(x.val), value, rtol=1e-6)


def with_literal(g: Graph, v: object, name: str, value: float) -> object | None:
    """`v = name(value, other)` in either operand order → other."""
    eqn = g.op(v, name)
    if eqn is None:
        return None
    a, b = eqn.invars
    return b if literal_is(a, value) else a if literal_is(b, value) else None


Matcher = Callable[[Graph, core.JaxprEqn], "tuple | None"]
Passes = Sequence[Mapping[str, Sequence[Matcher]]]  # per pass, root primitive name -> matchers tried in order


def plan(jaxpr: core.Jaxpr, passes: Passes) -> dict[int, Fusion]:
    """Fusions keyed by the index of their root (last) equation; an equation joins at most one chain, the first
    found (passes in order, equations in order, matchers in order)."""
    g = Graph(jaxpr)
    fusions: dict[int, Fusion] = {}
    taken: set[int] = set()
    for matchers, (i, root) in itertools.product(passes, enumerate(jaxpr.eqns)):
        if not np.issubdtype(root.outvars[0].aval.dtype, np.floating):
            continue
        for matcher in matchers.get(root.primitive.name, ()):
            found = matcher(g, root)
            if found is None:
                continue
            inputs, chain, emit = found
            covered = frozenset(g.index[id(e)] for e in chain)
            inner = [v for e in chain if e is not root for v in e.outvars]
            inside = Counter(v for e in chain for v in e.invars if isinstance(v, core.Var))
            if covered & taken or any(g.uses[v] != inside[v] for v in inner):
                continue
            fusions[i] = Fusion(tuple(inputs), covered, emit)
            taken |= covered
            break
    return fusions
