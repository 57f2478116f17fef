"""Control flow for torch.export (`.pt2` and AOTInductor): cond, while and scan as torch's higher-order ops
(`torch.cond`, `while_loop`, `scan`), whose bodies are nested functions traced once, for every size and every
trip count. The TorchScript forms (rules/control_flow.py) are Python statements, which torch.export would run
once on the example and bake in: its branch, its trip count, and a guard on the sizes it saw.

The higher-order ops require that a body's outputs be new tensors: an output that is one of its inputs (a carry
passed through) or a value from outside (a parameter) is returned as a copy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from jax._src import core

from trainkit.export.torchscript.emitter import Emitter, Rule, Value, is_float
from trainkit.export.torchscript.rules import control_flow

HOPS = "torch._higher_order_ops"
# The jaxpr primitive -> the torch op it becomes, as the sidecar's `control_flow` reports it (`Emitter.control_flow`).
HOP_NAMES = {"cond": "torch.cond", "while": f"{HOPS}.while_loop", "scan": f"{HOPS}.scan"}
_ASSIGNED = re.compile(r"^\s*([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*,?\s*=(?!=)")


def function(g: Emitter, params: Sequence[str], body: Callable[[], list[Value]], unpack: str = "",
             split: int | None = None, carry: int = 0) -> str:
    """Emit `def f(params): ...; return outputs` and return its name. `body()` translates the outputs;
    `split`: return them as two tuples, `(outs[:split], outs[split:])` (a scan step's carry and output), else
    as one tuple; `unpack`: a first line (a scan step's tuples into names); the first `carry` outputs are
    loop carries, returned contiguous (a loop's carry must keep its strides from step to step)."""
    name = g.fresh("f")
    g.nested += 1
    with g.block(f"def {name}({', '.join(params)}):"):
        if unpack:
            g.emit(unpack)
        start = len(g.lines)
        outs = g.materialize(body())
        assigned = {n.strip() for line in g.lines[start:] if (m := _ASSIGNED.match(line)) for n in m[1].split(",")}
        fresh, seen = [], set()
        for k, o in enumerate(outs):
            fresh.append((o if o in assigned and o not in seen else f"{o}.clone()")
                         + (".contiguous()" if k < carry else ""))
            seen.add(o)
        if split is None:
            g.emit(f"return {_tuple(fresh)}")
        else:
            g.emit(f"return {_tuple(fresh[:split])}, {_tuple(fresh[split:])}")
    g.nested -= 1
    return name


def _tuple(items: Sequence[str]) -> str:
    return f"({', '.join(items)},)" if items else "()"


def _new_carry(g: Emitter, values: list[Value]) -> list[str]:
    """A loop's initial carry as new contiguous tensors: a broadcast zero state has stride 0 (the body's
    results do not), and AOTInductor cannot lower a loop that carries a constant (a literal's buffer)."""
    return [g.assign(f"{x}.clone(memory_format=torch.contiguous_format)") for x in g.materialize(values)]


def _bind(g: Emitter, expr: str, n: int, prefix: str = "r") -> list[str]:
    names = [g.fresh(prefix) for _ in range(n)]
    g.emit(f"{', '.join(names)}, = {expr}" if names else expr)
    return names


def emit_cond(g: Emitter, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
    """`torch.cond` on the index (clamped as JAX does: <= 0 the first branch, past the end the last); more
    than two branches nest. A constant index translates its branch only."""
    if isinstance(ins[0], core.Literal):
        return control_flow.emit_cond(g, eqn, ins)
    g.control_flow.add(HOP_NAMES["cond"])
    branches = eqn.params["branches"]
    index, operands = g.t(ins[0]), g.materialize(ins[1:])
    params = [g.fresh("a") for _ in operands]
    fns = []
    for k, branch in enumerate(branches):
        with g.inside(f"cond branch {k}"):
            fns.append(function(g, params, lambda b=branch: g.run_closed(b, list(params))))
    chosen = fns[-1]
    for k in range(len(branches) - 2, 0, -1):  # the middle branches: index == k
        inner = chosen
        chosen = function(g, params, lambda k=k, inner=inner: _bind(
            g, f"torch.cond({index} == {k}, {fns[k]}, {inner}, {_tuple(params)})", len(eqn.outvars)))
    if len(branches) == 1:
        return _bind(g, f"{fns[0]}(*{_tuple(operands)})", len(eqn.outvars))
    return _bind(g, f"torch.cond({index} <= 0, {fns[0]}, {chosen}, {_tuple(operands)})", len(eqn.outvars))


def emit_while(g: Emitter, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
    """`while_loop(cond_fn, body_fn, carry)`; the loop's constants are closed over."""
    p = eqn.params
    g.control_flow.add(HOP_NAMES["while"])
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, init = ins[:nc], ins[nc:nc + nb], _new_carry(g, ins[nc + nb:])
    carry = [g.fresh("w") for _ in init]
    with g.inside("while loop condition"):
        cond_fn = function(g, carry, lambda: g.run_closed(p["cond_jaxpr"], cond_consts + list(carry)))
    with g.inside("while loop body"):
        body_fn = function(g, carry, lambda: g.run_closed(p["body_jaxpr"], body_consts + list(carry)),
                           carry=len(carry))
    # cond_fn returns a 1-tuple; while_loop wants the predicate itself
    test = g.fresh("f")
    g.emit(f"def {test}(*c): return {cond_fn}(*c)[0]")
    return _bind(g, f"{HOPS}.while_loop({test}, {body_fn}, {_tuple(init)})", len(init), "w")


def emit_scan(g: Emitter, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
    """`scan(step, carry, xs, reverse=...)` along the leading axis. A scan without xs (a fori_loop) scans over
    `arange(length)`, and one without carry carries a dummy scalar: the op needs both. For AOTInductor (no
    autograd), the per-step outputs are written into buffers in the carry, at the step's index, and the op's
    own outputs are a dummy scalar: Inductor cannot lower stacked outputs with a dynamic size (KeyError on the
    size's symbol), nor a scan without outputs."""
    p = eqn.params
    nc, ncarry = control_flow.scan_operands(p, len(ins))
    integer_carry = any(not is_float(v.aval) for v in eqn.invars[nc:nc + ncarry])
    if g.grad == "exact" and integer_carry and isinstance(p["length"], int):
        # torch's scan cannot differentiate through an integer carry (a fori_loop's counter): unrolled instead
        g.control_flow.add(f"scan: unrolled ({p['length']} steps)")
        return control_flow.emit_scan(g, eqn, ins)
    g.control_flow.add(HOP_NAMES["scan"])
    consts, init, xs = ins[:nc], _new_carry(g, ins[nc:nc + ncarry]), [g.t(x) for x in ins[nc + ncarry:]]
    y_vars, length = eqn.outvars[ncarry:], g.dim(p["length"])
    buffered = g.grad == "none" and bool(y_vars)
    if buffered:
        init += [g.assign(f"torch.zeros({g.shape(v.aval.shape)}, dtype={g.dtype(v.aval.dtype)}, device={g.device})")
                 for v in y_vars] + [g.assign(f"torch.zeros([], dtype=torch.int64, device={g.device})")]
    dummy_x = not xs
    if dummy_x:
        xs = [g.assign(f"torch.arange({length}, device={g.device})")]
    dummy_carry = not init
    if dummy_carry:
        init = [g.assign(f"torch.zeros([], device={g.device})")]
    carry_p, x_p, cs, xp = [g.fresh("c") for _ in init], [g.fresh("x") for _ in xs], g.fresh("cs"), g.fresh("xs")
    unpack = f"{', '.join(carry_p)}, = {cs}; {', '.join(x_p)}, = {xp}"
    scalar = f"torch.zeros([], device={g.device})"

    def step() -> list[Value]:
        outs = g.run_closed(p["jaxpr"], consts + carry_p[:ncarry] + ([] if dummy_x else x_p))
        if not buffered:
            return ([carry_p[0]] if dummy_carry else []) + outs + ([] if y_vars else [scalar])
        i = carry_p[-1]
        at = g.assign(f"({length} - 1 - {i}).reshape([1])" if p["reverse"] else f"{i}.reshape([1])")
        written = [g.assign(f"{b}.index_copy(0, {at}, {g.t(y)}.unsqueeze(0))")
                   for b, y in zip(carry_p[ncarry:], outs[ncarry:])]
        return outs[:ncarry] + written + [g.assign(f"{i} + 1"), scalar]

    with g.inside("scan body"):
        fn = function(g, [cs, xp], step, unpack, split=len(init), carry=len(init))
    ys_out, carry_out = g.fresh("ys"), g.fresh("cs")
    g.emit(f"{carry_out}, {ys_out} = {HOPS}.scan({fn}, {_tuple(init)}, {_tuple(xs)}, reverse={bool(p['reverse'])})")
    carry = [] if dummy_carry else _bind(g, carry_out, len(init), "w")
    if buffered:
        return carry[:ncarry + len(y_vars)]
    return carry + _bind(g, ys_out, max(len(y_vars), 1), "ys")[:len(y_vars)]


# What the torch.export table (`registry.EXPORT_RULES`) puts in place of `control_flow.RULES`' statements.
RULES: dict[str, Rule] = {"cond": emit_cond, "while": emit_while, "scan": emit_scan}
