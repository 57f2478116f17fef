"""Primitive → torch code for primitives that change shape: reductions, broadcasts, reshapes, transposes,
concatenation, slices and iota.

Each rule is `rule(g: Emitter, eqn, ins) -> [expression per output]` (see rules/elementwise.py). Reductions
already agree with JAX's gradients (amax/amin split ties evenly).
"""

from __future__ import annotations

import numpy as np

from trainkit.export.torchscript.emitter import Emitter, Rule, int_list, is_float, placed, rule_table, same_dim

# ---- reductions -------------------------------------------------------------------------------------------
_REDUCTIONS = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or")


def _reduce(g: Emitter, eqn, ins) -> list[str]:
    x, axes, name = g.t(ins[0]), tuple(eqn.params["axes"]), eqn.primitive.name
    if not axes:
        return [x]
    is_bool = eqn.invars[0].aval.dtype == np.bool_
    if name in ("reduce_and", "reduce_or") or (is_bool and name in ("reduce_max", "reduce_min")):
        fn = "torch.any" if name in ("reduce_or", "reduce_max") else "torch.all"
        return [f"{fn}({x}, {int_list(axes)})"]
    if name == "reduce_sum":
        dtype = "" if is_float(eqn.invars[0].aval) else f", dtype={g.dtype(eqn.outvars[0].aval.dtype)}"
        return [f"torch.sum({x}, {int_list(axes)}, False{dtype})"]
    if name in ("reduce_max", "reduce_min"):  # amax/amin split the gradient between ties, like JAX
        return [f"torch.{'amax' if name == 'reduce_max' else 'amin'}({x}, {int_list(axes)})"]
    for a in sorted(axes, reverse=True):
        x = g.assign(f"torch.prod({x}, {int(a)})")
    return [x]


def _argmax(g: Emitter, eqn, ins) -> list[str]:
    (axis,) = eqn.params["axes"]
    dtype = g.dtype(eqn.params["index_dtype"])
    return [f"torch.{eqn.primitive.name}({g.t(ins[0])}, {int(axis)}).to({dtype})"]


# ---- shapes -----------------------------------------------------------------------------------------------
def _broadcast_in_dim(g: Emitter, eqn, ins) -> list[str]:
    shape, bdims = eqn.params["shape"], tuple(eqn.params["broadcast_dimensions"])
    out = eqn.outvars[0].aval
    if not isinstance(ins[0], str):
        name = g.assign(f"torch.full({g.shape(shape)}, {g.s(ins[0])}, dtype={g.dtype(out.dtype)}, device={g.device})")
        g.fills[name] = ins[0]
        return [name]
    x, in_shape = ins[0], eqn.invars[0].aval.shape
    if len(bdims) < len(shape):
        x = g.assign(x + "".join(f".unsqueeze({d})" for d in range(len(shape)) if d not in bdims))
    full = [1] * len(shape)
    for i, d in enumerate(bdims):
        full[d] = in_shape[i]
    if all(same_dim(a, b) for a, b in zip(full, shape)):
        return [x]
    return [f"{x}.expand({g.shape(shape)})"]


def _reshape(g: Emitter, eqn, ins) -> list[str]:
    x = g.t(ins[0])
    if eqn.params.get("dimensions") is not None:
        x = g.assign(f"{x}.permute({int_list(eqn.params['dimensions'])})")
    return [f"{x}.reshape({g.shape(eqn.params['new_sizes'])})"]


def _reshape_to_output(g: Emitter, eqn, ins) -> list[str]:
    return [f"{g.t(ins[0])}.reshape({g.shape(eqn.outvars[0].aval.shape)})"]


def _transpose(g: Emitter, eqn, ins) -> list[str]:
    return [f"{g.t(ins[0])}.permute({int_list(eqn.params['permutation'])})"]


def _concatenate(g: Emitter, eqn, ins) -> list[str]:
    return [f"torch.cat([{', '.join(g.t(x) for x in ins)}], {int(eqn.params['dimension'])})"]


def _stack(g: Emitter, eqn, ins) -> list[str]:
    return [f"torch.stack([{', '.join(g.t(x) for x in ins)}], {int(eqn.params['axis'])})"]


def _tile(g: Emitter, eqn, ins) -> list[str]:
    return [f"{g.t(ins[0])}.repeat({int_list(eqn.params['reps'])})"]


def _rev(g: Emitter, eqn, ins) -> list[str]:
    return [f"torch.flip({g.t(ins[0])}, {int_list(eqn.params['dimensions'])})"]


def _split(g: Emitter, eqn, ins) -> list[str]:
    sizes = "[" + ", ".join(g.dim(s) for s in eqn.params["sizes"]) + "]"
    parts = g.assign(f"torch.split({g.t(ins[0])}, {sizes}, {int(eqn.params['axis'])})")
    return [f"{parts}[{k}]" for k in range(len(eqn.outvars))]


def _slice(g: Emitter, eqn, ins) -> list[str]:
    p, shape = eqn.params, eqn.invars[0].aval.shape
    x = g.t(ins[0])
    strides = p["strides"] or (1,) * len(shape)
    for d, (start, limit, stride, size) in enumerate(zip(p["start_indices"], p["limit_indices"], strides, shape)):
        if not (same_dim(start, 0) and same_dim(limit, size) and stride == 1):
            # aten.slice on the sliced dims only: `x[:, a:b]` would also record a full-copy backward for `:`
            x = g.assign(f"torch.ops.aten.slice({x}, {d}, {g.dim(start)}, {g.dim(limit)}, {int(stride)})")
    return [x]


def _iota(g: Emitter, eqn, ins) -> list[str]:
    p = eqn.params
    shape, dim = p["shape"], int(p["dimension"])
    x = f"torch.arange({g.dim(shape[dim])}, dtype={g.dtype(p['dtype'])}, device={g.device})"
    if len(shape) == 1:
        return [x]
    return [f"{placed(x, dim, len(shape))}.expand({g.shape(shape)})"]


RULES: dict[str, Rule] = rule_table(
    dict.fromkeys(_REDUCTIONS, _reduce),
    dict.fromkeys(("argmax", "argmin"), _argmax),
    {"broadcast_in_dim": _broadcast_in_dim, "reshape": _reshape},
    dict.fromkeys(("squeeze", "expand_dims"), _reshape_to_output),
    {"transpose": _transpose, "concatenate": _concatenate, "stack": _stack, "tile": _tile, "rev": _rev,
     "split": _split, "slice": _slice, "iota": _iota},
)
