"""Control-flow primitives (cond, while, scan) → TorchScript `if`, `while` and `for` statements."""

from __future__ import annotations

import numpy as np
from jax._src import core

from trainkit.export.torchscript.emitter import Emitter, Rule, Unsupported, Value, rule_table


def emit_cond(g: Emitter, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
    """`if/elif/else` on the (clamped) branch index; every branch assigns the same result names. A constant
    index (`platform_index`) translates its branch only."""
    branches = eqn.params["branches"]
    if isinstance(ins[0], core.Literal):
        k = min(max(int(ins[0].val), 0), len(branches) - 1)
        with g.inside(f"cond branch {k}"):
            return g.run_closed(branches[k], ins[1:])
    index = g.assign(f"int({g.t(ins[0])})", "i")
    results = [g.fresh("r") for _ in eqn.outvars]
    for k, branch in enumerate(branches):
        if k == 0:
            header = f"if {index} <= 0:" if len(branches) > 1 else "if True:"
        elif k == len(branches) - 1:
            header = "else:"
        else:
            header = f"elif {index} == {k}:"
        with g.block(header), g.inside(f"cond branch {k}"):
            outs = g.materialize(g.run_closed(branch, ins[1:]))
            g.emit(f"{', '.join(results)}, = ({', '.join(outs)},)")
    return list(results)


def emit_while(g: Emitter, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
    """A Python `while` over the carried tensors, re-evaluating the condition jaxpr at the end of each pass."""
    p = eqn.params
    cond_consts, body_consts = ins[:p["cond_nconsts"]], ins[p["cond_nconsts"]:p["cond_nconsts"] + p["body_nconsts"]]
    init = ins[p["cond_nconsts"] + p["body_nconsts"]:]
    carry = [g.fresh("w") for _ in init]
    g.emit(f"{', '.join(carry)}, = ({', '.join(g.materialize(init))},)")
    go = g.fresh("go")
    with g.inside("while loop condition"):
        (pred,) = g.run_closed(p["cond_jaxpr"], cond_consts + carry)
    g.emit(f"{go} = bool({g.t(pred)})")
    with g.block(f"while {go}:"), g.inside("while loop body"):
        new = g.materialize(g.run_closed(p["body_jaxpr"], body_consts + carry))
        g.emit(f"{', '.join(carry)}, = ({', '.join(new)},)")
        (pred,) = g.run_closed(p["cond_jaxpr"], cond_consts + carry)
        g.emit(f"{go} = bool({g.t(pred)})")
    return list(carry)


def scan_operands(p: dict, n: int) -> tuple[int, int]:
    """How many of a scan's `n` operands are constants and carries (the rest are xs)."""
    if "ft_in" in p:  # jax >= 0.11: a FlatTree grouping the operands as (consts, carry, xs)
        consts, carry, _ = p["ft_in"].update(list(range(n))).unpack()
        return len(list(consts)), len(list(carry))
    return p["num_consts"], p["num_carry"]


def emit_scan(g: Emitter, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
    """A `for` loop over the leading axis; per-step outputs are collected in lists and stacked."""
    p = eqn.params
    nc, ncarry = scan_operands(p, len(ins))
    consts, init, xs = ins[:nc], ins[nc:nc + ncarry], [g.t(x) for x in ins[nc + ncarry:]]
    length = g.dim(p["length"])
    carry = [g.fresh("w") for _ in init]
    if carry:
        g.emit(f"{', '.join(carry)}, = ({', '.join(g.materialize(init))},)")
    ys = [g.fresh("ys") for _ in eqn.outvars[ncarry:]]
    for y in ys:
        g.emit(f"{y}: List[torch.Tensor] = []")
    i = g.fresh("i")
    with g.block(f"for {i} in range({length}):"), g.inside("scan body"):
        step = g.assign(f"{length} - 1 - {i}", "j") if p["reverse"] else i
        outs = g.materialize(g.run_closed(p["jaxpr"], consts + carry + [f"{x}[{step}]" for x in xs]))
        if carry:
            g.emit(f"{', '.join(carry)}, = ({', '.join(outs[:ncarry])},)")
        for y, o in zip(ys, outs[ncarry:]):
            g.emit(f"{y}.append({o})")
    stacked = []
    for y, v in zip(ys, eqn.outvars[ncarry:]):
        if p["reverse"]:
            g.emit(f"{y}.reverse()")
        empty = f"torch.zeros({g.shape(v.aval.shape)}, dtype={g.dtype(v.aval.dtype)}, device={g.device})"
        stacked.append(g.assign(f"torch.stack({y}) if len({y}) > 0 else {empty}"))
    return carry + stacked


def platform_index(g: Emitter, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
    """`lax.platform_dependent`'s branch index, as a constant: the default branch (platforms `None`), else the
    CPU one. The exported module runs the generic computation, not a TPU/GPU kernel's lowering."""
    platforms = list(eqn.params["platforms"])
    chosen = next((k for k, p in enumerate(platforms) if p is None), None)
    if chosen is None:
        chosen = next((k for k, p in enumerate(platforms) if "cpu" in p), None)
    if chosen is None:
        raise Unsupported(f"has no default or CPU branch among {platforms}")
    return [core.Literal(np.int32(chosen), eqn.outvars[0].aval)]


RULES: dict[str, Rule] = rule_table({"cond": emit_cond, "while": emit_while, "scan": emit_scan,
                                     "platform_index": platform_index})
