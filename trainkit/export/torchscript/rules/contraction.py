"""Primitive → torch code for contractions: dot_general and conv_general_dilated.

Common layouts get a single GEMM (`x @ W`, batched matmul, flax DenseGeneral); matrix-vector-like
contractions become a broadcast product summed in place; the rest goes through `torch.einsum`.
"""

from __future__ import annotations

import numpy as np

from trainkit.export.torchscript.emitter import Emitter, Rule, Unsupported, int_list, rule_table, torch_pad


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _dot_general(g: Emitter, eqn, ins) -> list[str]:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    out_dtype = eqn.outvars[0].aval.dtype
    a, b = g.t(ins[0]), g.t(ins[1])
    if lhs.dtype != out_dtype:
        a = g.assign(f"{a}.to({g.dtype(out_dtype)})")
    if rhs.dtype != out_dtype:
        b = g.assign(f"{b}.to({g.dtype(out_dtype)})")
    lc, rc, lb, rb = map(tuple, (lc, rc, lb, rb))
    if not lb and rhs.ndim == 2 and lc == (lhs.ndim - 1,) and rc == (0,):
        return [f"torch.matmul({a}, {b})"]
    if not lb and rhs.ndim == 2 and lc == (lhs.ndim - 1,) and rc == (1,):
        return [f"torch.matmul({a}, {b}.t())"]
    if not lb and lc == tuple(range(lhs.ndim - len(lc), lhs.ndim)) and rc == tuple(range(len(rc))):
        # flax DenseGeneral (x @ kernel[in..., out...]): one GEMM on flattened views
        k = len(lc)
        free_l, free_r = lhs.shape[:lhs.ndim - k], rhs.shape[k:]
        a2 = g.assign(f"{a}.reshape({g.shape(list(free_l) + [-1])})")
        b2 = g.assign(f"{b}.reshape({g.shape([-1] if not free_r else [np.prod(rhs.shape[:k]), -1])})")
        return [f"torch.matmul({a2}, {b2}).reshape({g.shape(list(free_l) + list(free_r))})"]
    n = len(lb)
    if (lb == rb == tuple(range(n)) and lhs.ndim == rhs.ndim == n + 2 and lc == (n + 1,)
            and rc in ((n,), (n + 1,))):  # batched matmul, JAX output order is batch, lhs free, rhs free
        return [f"torch.matmul({a}, {b})" if rc == (n,) else f"torch.matmul({a}, {b}.transpose(-1, -2))"]
    letters = iter(_LETTERS)
    ls = [next(letters) for _ in range(lhs.ndim)]
    rs = [next(letters) for _ in range(rhs.ndim)]
    for i, j in zip(lc + lb, rc + rb):
        rs[j] = ls[i]
    out = [ls[i] for i in lb] + [ls[i] for i in range(lhs.ndim) if i not in lc + lb]
    out += [rs[j] for j in range(rhs.ndim) if j not in rc + rb]
    if lhs.ndim == len(lc + lb) or rhs.ndim == len(rc + rb):
        return [_multiply_and_sum(g, (a, ls), (b, rs), [ls[i] for i in lc], out)]
    return [f'torch.einsum("{"".join(ls)},{"".join(rs)}->{"".join(out)}", [{a}, {b}])']


def _multiply_and_sum(g: Emitter, x: tuple[str, list], y: tuple[str, list], summed: list, out: list) -> str:
    """A contraction where one side has no free dims (batched matrix-vector, weighted sums) as a broadcast
    product summed in the larger operand's own layout: bmm with a vector side is several times slower, and
    permuting the large operand first would copy it."""
    (big, big_dims), (small, small_dims) = (x, y) if len(x[1]) >= len(y[1]) else (y, x)
    layout = big_dims + [d for d in small_dims if d not in big_dims]
    big = big + ".unsqueeze(-1)" * (len(layout) - len(big_dims))
    order = sorted(range(len(small_dims)), key=lambda k: layout.index(small_dims[k]))
    if order != list(range(len(small_dims))):
        small = f"{small}.permute({int_list(order)})"
    small += "".join(f".unsqueeze({k})" for k, d in enumerate(layout) if d not in small_dims)
    product = g.assign(f"{big} * {small}")
    if summed:
        product = g.assign(f"torch.sum({product}, {int_list(sorted(layout.index(d) for d in summed))})")
    kept = [d for d in layout if d not in summed]
    perm = [kept.index(d) for d in out]
    return product if perm == list(range(len(perm))) else f"{product}.permute({int_list(perm)})"


def _conv(g: Emitter, eqn, ins) -> list[str]:
    return [conv(g, eqn, g.t(ins[0]), g.t(ins[1]))]


def conv(g: Emitter, eqn, x: str, w: str, bias: str = "None") -> str:
    """torch.conv{1,2,3}d in the equation's layouts; `bias` (1-d, per output feature) is added by the conv
    kernel itself (fusion/native.py matches conv + bias)."""
    p = eqn.params
    if p["batch_group_count"] != 1:
        raise Unsupported("with batch_group_count != 1 is not supported")
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    nsp = len(lhs_spec) - 2
    if nsp not in (1, 2, 3):
        raise Unsupported(f"with {nsp} spatial dimensions is not supported")
    if tuple(lhs_spec) != tuple(range(nsp + 2)):
        x = g.assign(f"{x}.permute({int_list(lhs_spec)})")
    if tuple(rhs_spec) != tuple(range(nsp + 2)):
        w = g.assign(f"{w}.permute({int_list(rhs_spec)})")
    if any(int(d) != 1 for d in p["lhs_dilation"]):  # transposed conv: insert zeros between input pixels
        sizes = [f"{x}.size({k + 2}) + ({x}.size({k + 2}) - 1) * {int(d) - 1}" for k, d in enumerate(p["lhs_dilation"])]
        z = g.assign(f"{x}.new_zeros([{x}.size(0), {x}.size(1), {', '.join(sizes)}])")
        g.emit(f"{z}[:, :, {', '.join(f'::{int(d)}' for d in p['lhs_dilation'])}] = {x}")
        x = z
    pads = [(g.dim(lo), g.dim(hi)) for lo, hi in p["padding"]]
    if all(lo == hi and not lo.startswith("-") for lo, hi in pads):
        padding = "[" + ", ".join(lo for lo, _ in pads) + "]"
    else:
        x = g.assign(f"torch.constant_pad_nd({x}, {torch_pad(pads)}, 0.0)")
        padding = "[" + ", ".join(["0"] * nsp) + "]"
    out = g.assign(f"torch.conv{nsp}d({x}, {w}, {bias}, {int_list(p['window_strides'])}, {padding}, "
                   f"{int_list(p['rhs_dilation'])}, {int(p['feature_group_count'])})")
    perm = [0] * (nsp + 2)
    for i, o in enumerate(out_spec):
        perm[o] = i
    return out if perm == list(range(nsp + 2)) else f"{out}.permute({int_list(perm)})"


RULES: dict[str, Rule] = rule_table({"dot_general": _dot_general, "conv_general_dilated": _conv})
