"""Call primitives → their sub-jaxpr translated in place: jit, remat and custom_vjp's primal are inlined;
custom_jvp keeps the primal's value and takes its gradient from the custom JVP rule."""

from __future__ import annotations

import warnings
from typing import Any

from jax._src import core

from trainkit.export.torchscript.emitter import Emitter, Rule, Value, is_float, rule_table

# Primitives whose only job is to call a sub-jaxpr; they are inlined.
CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_lin",
                   "custom_vjp_call", "custom_vjp_call_jaxpr")
# custom_jvp functions from JAX itself whose torch-native op has the same value and the same gradient.
NATIVE_CUSTOM_JVP = {
    "relu": lambda x: f"torch.relu({x[0]})",
    "relu6": lambda x: f"torch.nn.functional.hardtanh({x[0]}, 0.0, 6.0)",
    "logaddexp": lambda x: f"torch.logaddexp({x[0]}, {x[1]})",
}
_MAX_JVP_NESTING = 4


def inline_call(g: Emitter, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
    """The called jaxpr, translated in place (jit, remat, custom_vjp's primal, ...)."""
    params = eqn.params
    sub = params.get("jaxpr", params.get("call_jaxpr", params.get("fun_jaxpr")))
    label = params.get("name", getattr(getattr(sub, "jaxpr", sub).debug_info, "func_name", ""))
    if eqn.primitive.name.startswith("custom_vjp"):
        warnings.warn(f"custom_vjp function '{label}' is exported as its primal computation: torch autograd "
                      "differentiates the primal, not the custom backward rule", stacklevel=2)
    with g.inside(f"{eqn.primitive.name} '{label}'"):
        return g.run_closed(sub, ins)


def custom_jvp(g: Emitter, eqn: core.JaxprEqn, ins: list[Value]) -> list[Value]:
    """The primal's value; where an input requires grad, the gradient of the custom JVP rule."""
    call = eqn.params["call_jaxpr"]
    jvp_fun = eqn.params["jvp_jaxpr_fun"]
    label = call.jaxpr.debug_info.func_name
    from_jax = "jax/_src/" in str(getattr(jvp_fun.debug_info, "func_src_info", ""))
    nconsts = eqn.params["num_consts"]
    primals = ins[nconsts:]
    with g.inside(f"custom_jvp_call '{label}'"):
        if from_jax and label in NATIVE_CUSTOM_JVP and len(eqn.outvars) == 1:
            return [g.assign(NATIVE_CUSTOM_JVP[label]([g.t(x) for x in primals]))]
        diff = [i for i, v in enumerate(eqn.invars[nconsts:]) if is_float(v.aval)]
        live = [primals[i] for i in diff if g.needs_grad(primals[i])]
        if not live or g.jvp_nesting >= _MAX_JVP_NESTING:
            return g.run_closed(call, ins)
        results = [g.fresh("r") for _ in eqn.outvars]
        if g.grad == "exact":  # a graph traced once for autograd: the JVP form, always
            _emit_jvp_branch(g, eqn, jvp_fun, primals, diff, results)
            return list(results)
        with g.block(f"if {' or '.join(f'{x}.requires_grad' for x in live)}:"):
            _emit_jvp_branch(g, eqn, jvp_fun, primals, diff, results)
        with g.block("else:"):
            outs = g.materialize(g.run_closed(call, ins))
            g.emit(f"{', '.join(results)}, = ({', '.join(outs)},)")
        return list(results)


def _emit_jvp_branch(g: Emitter, eqn: core.JaxprEqn, jvp_fun: Any, primals: list[Value], diff: list[int],
                     results: list[str]) -> None:
    """out = primal(x̄) + (T - T.detach()) with T = JVP(x̄, x - x̄): value of the primal, gradient Jᵀ·g."""
    key = id(eqn)
    if key not in g.jvp_cache:
        zeros = [i not in diff for i in range(len(primals))]
        g.jvp_cache[key] = jvp_fun.call_wrapped(*zeros)
    jvp_jaxpr, jvp_consts, out_zeros = g.jvp_cache[key]
    detached, tangents = list(primals), []
    for i in diff:
        x = g.t(primals[i])
        detached[i] = g.assign(f"{x}.detach()")
        g.mark_no_grad(detached[i])
        tangents.append(g.assign(f"{x} - {detached[i]}"))
    g.jvp_nesting += 1
    try:
        outs = g.run_jaxpr(jvp_jaxpr, [g.const(c) for c in jvp_consts], detached + tangents)
    finally:
        g.jvp_nesting -= 1
    primal_outs, tangent_outs = outs[:len(out_zeros)], iter(outs[len(out_zeros):])
    final = []
    for p, zero, v in zip(primal_outs, out_zeros, eqn.outvars):
        p = g.t(p)
        if zero or not is_float(v.aval):
            final.append(p)
            continue
        tan = g.t(next(tangent_outs))
        final.append(f"{p} + torch.nan_to_num({tan} - {tan}.detach(), 0.0, 0.0, 0.0)")
    g.emit(f"{', '.join(results)}, = ({', '.join(final)},)")


RULES: dict[str, Rule] = rule_table(dict.fromkeys(CALL_PRIMITIVES, inline_call), {"custom_jvp_call": custom_jvp})
