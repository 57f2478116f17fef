"""In-place fusions on a Dense's fresh output: `act(x @ W + b)` and `r + (x @ W + b)`.

A Dense becomes `linear`, whose output is a new tensor that nothing else holds, so the op after it can write
into it instead of allocating another activation-sized tensor: on CPU a new tensor costs page faults and cache
misses that take longer than the elementwise pass itself (measured, one thread, the lm_chars MLP 2048×128 →
512 → 128: tanh-GELU as 6 out-of-place ops 8.0 ms, native `gelu` 4.4 ms, in place 1.2 ms).

In place only when the output does not require grad (under `torch.no_grad()`, or when no input requires grad),
decided at run time; otherwise the same out-of-place code as without the Dense. Not only because gelu's and
silu's backward read their input: `linear` of a 3-d input returns a view, and once TorchScript's autodiff has
compiled the graph (from the second call on) that view's base is a leaf, which autograd forbids writing into
(relu and add, whose backward would allow it, fail the same way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jax._src import core

from trainkit.export.torchscript.fusion.graph import Graph
from trainkit.export.torchscript.fusion.native import (GELU_CUBIC, GELU_LINEAR, dense_of, is_jax_relu, match_gelu_erf,
                                                       match_gelu_tanh, match_silu)

# tanh-GELU in place runs over chunks this size (256 KiB of float32: its one temporary stays in L2 cache).
# ATen's own gelu(approximate="tanh") takes 2.3 ms on 1M floats, this 1.2 ms, both in place, one thread.
GELU_CHUNK = 65536


def _gelu_tanh_in_place(g: Any, h: str) -> None:
    # The same arithmetic, in the same order, as fusion/native.py's out-of-place x * sigmoid(x * (a + b * (x * x))).
    c = g.fresh("c")
    with g.block(f"for {c} in torch.split({h}.view(-1), {GELU_CHUNK}):"):
        g.emit(f"{c}.mul_(torch.mul({c}, {c}).mul_({GELU_CUBIC!r}).add_({GELU_LINEAR!r}).mul_({c}).sigmoid_())")


_IN_PLACE = {  # activation matcher → emits the lines that apply it to tensor `h` in place
    match_gelu_tanh: _gelu_tanh_in_place,
    match_gelu_erf: lambda g, h: g.emit(f"torch.ops.aten.gelu_({h})"),
    match_silu: lambda g, h: g.emit(f"torch.ops.aten.silu_({h})"),
}


def dense_activation(g: Graph, root: core.JaxprEqn) -> tuple | None:
    """gelu / silu of a Dense → the activation in place on `linear`'s output."""
    for matcher, in_place in _IN_PLACE.items():
        found = matcher(g, root)
        dense = dense_of(g, found[0][0]) if found else None
        if dense is not None:
            inputs, chain, linear = dense
            return inputs, found[1] + chain, lambda g, a: _unless_grad(g, linear(g, a), [], in_place, found[2])
    return None


def dense_jitted_silu(g: Graph, root: core.JaxprEqn) -> tuple | None:
    """jax.nn.silu, which arrives as a `jit` of x * logistic(x), of a Dense → as `dense_activation`."""
    body = root.params["jaxpr"].jaxpr
    if root.params.get("name") != "silu" or len(root.invars) != 1 or len(body.eqns) != 2 or body.constvars:
        return None
    found = match_silu(Graph(body), body.eqns[-1])
    dense = dense_of(g, root.invars[0])
    if found is None or found[0][0] is not body.invars[0] or body.outvars[0] is not body.eqns[-1].outvars[0] \
            or dense is None:
        return None
    inputs, chain, linear = dense
    return inputs, [root, *chain], lambda g, a: _unless_grad(g, linear(g, a), [], _IN_PLACE[match_silu], found[2])


def dense_relu(g: Graph, root: core.JaxprEqn) -> tuple | None:
    """jax.nn.relu of a Dense → `relu_` on `linear`'s output."""
    dense = dense_of(g, root.invars[0]) if is_jax_relu(root) else None
    if dense is None:
        return None
    inputs, chain, linear = dense
    return inputs, [root, *chain], lambda g, a: _unless_grad(
        g, linear(g, a), [], lambda g, h: g.emit(f"torch.relu_({h})"), lambda g, h: f"torch.relu({h[0]})")


def dense_residual(g: Graph, root: core.JaxprEqn) -> tuple | None:
    """`r + Dense(x)` of the same shape and dtype → `linear(...).add_(r)`: no second output-sized tensor."""
    out = root.outvars[0].aval
    a, b = root.invars
    for y, r in ((a, b), (b, a)):
        dense = dense_of(g, y)
        if dense is None or not isinstance(r, core.Var) or r.aval.shape != out.shape or y.aval.shape != out.shape \
                or not r.aval.dtype == y.aval.dtype == out.dtype:
            continue
        inputs, chain, linear = dense
        if any(r in e.outvars for e in chain):  # e.g. dot + (dot + b): r is computed inside the chain
            continue
        return (*inputs, r), [root, *chain], lambda g, a: _unless_grad(
            g, linear(g, a[:3]), [a[3]], lambda g, h: g.emit(f"{h}.add_({a[3]})"),
            lambda g, h: f"torch.add({h[0]}, {a[3]})")
    return None


def _unless_grad(g: Any, expr: str, others: list[str], in_place: Callable[[Any, str], None],
                 out_of_place: Callable[[Any, list[str]], str]) -> str:
    """`in_place` on `expr`'s value where neither it nor `others` requires grad, else `out_of_place`."""
    h, out = g.assign(expr), g.fresh()
    with g.block(f"if {' or '.join(f'{x}.requires_grad' for x in [h, *others])}:"):
        g.emit(f"{out} = {out_of_place(g, [h])}")
    with g.block("else:"):
        in_place(g, h)
        g.emit(f"{out} = {h}")
    return out
