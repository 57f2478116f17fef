"""Primitive → torch code for indexing, windows and ordering: gather/scatter, dynamic slices, pad,
pooling windows (2-d float ones as native pooling, others by unfold), cumulative ops, sort and top_k.

Out-of-bounds starts are clamped as XLA does; `FILL_OR_DROP` gathers fill and scatters drop.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainkit.export.torchscript.emitter import (Emitter, Rule, Unsupported, int_list, placed, py_scalar, rule_table,
                                                 same_dim, torch_pad)


def _mode(eqn) -> str:
    return getattr(eqn.params.get("mode"), "name", str(eqn.params.get("mode")))


def _arange(g: Emitter, n: Any) -> str:
    return f"torch.arange({g.dim(n)}, device={g.device})"


def _batch_to(g: Emitter, x: str, trailing: int) -> str:
    return x + ".unsqueeze(-1)" * trailing


def _fill_value(g: Emitter, eqn, dtype: Any) -> str:
    fill = eqn.params.get("fill_value")
    if fill is not None:
        return py_scalar(np.asarray(fill).astype(dtype))
    if np.issubdtype(dtype, np.inexact):
        return 'float("nan")'
    if dtype == np.bool_:
        return "True"
    info = np.iinfo(dtype)
    return str(info.min if np.issubdtype(dtype, np.signedinteger) else info.max)


def _point_indices(g: Emitter, starts: str, op_shape: tuple, index_map: tuple, window_sizes: dict[int, Any],
                   window_axes: dict[int, int], batching: dict[int, int], nb: int, rank: int) -> tuple[list, str]:
    """Per operand dim, an int64 index tensor broadcastable to (batch..., window...), plus an in-bounds mask."""
    idx, valid = [], []
    for d, size in enumerate(op_shape):
        win = window_sizes[d]
        if d in batching:
            idx.append(placed(_arange(g, size), batching[d], rank))
        elif d in index_map:
            raw = g.assign(f"{starts}[..., {index_map.index(d)}]")
            hi = f"{g.dim(size)} - {g.dim(win)}"
            valid.append(f"({raw} >= 0) & ({raw} <= {hi})")
            start = _batch_to(g, g.assign(f"torch.clamp({raw}, 0, {hi})"), rank - nb)
            idx.append(f"{start} + {placed(_arange(g, win), window_axes[d], rank)}" if d in window_axes else start)
        else:
            idx.append(placed(_arange(g, win), window_axes[d], rank))
    return [g.assign(i) for i in idx], " & ".join(valid)


def _to_output(g: Emitter, x: str, nb: int, offset_dims: tuple, rank: int) -> str:
    """(batch..., window...) → JAX's gather layout (window axes at `offset_dims`)."""
    batch = iter(range(nb))
    perm = [nb + offset_dims.index(o) if o in offset_dims else next(batch) for o in range(rank)]
    return x if perm == list(range(rank)) else g.assign(f"{x}.permute({int_list(perm)})")


def _gather(g: Emitter, eqn, ins) -> list[str]:
    dn, sizes = eqn.params["dimension_numbers"], tuple(eqn.params["slice_sizes"])
    op, idx_aval = eqn.invars[0].aval, eqn.invars[1].aval
    x, starts = g.t(ins[0]), g.assign(f"{g.t(ins[1])}.to(torch.int64)")
    collapsed, index_map = tuple(dn.collapsed_slice_dims), tuple(dn.start_index_map)
    batching = dict(zip(dn.operand_batching_dims, dn.start_indices_batching_dims))
    window = [d for d in range(op.ndim) if d not in collapsed and d not in batching]
    nb, rank = idx_aval.ndim - 1, idx_aval.ndim - 1 + len(window)
    full = [d for d in range(op.ndim) if d not in index_map and d not in batching and same_dim(sizes[d], op.shape[d])]
    if not batching and all(d in collapsed for d in index_map) and len(full) + len(index_map) == op.ndim:
        # take/embedding lookups: operand[i0, i1, ...] with the indexed dims moved to the front
        perm = list(index_map) + full
        if perm != list(range(op.ndim)):
            x = g.assign(f"{x}.permute({int_list(perm)})")
        his = [g.dim(op.shape[d]) + " - 1" for d in index_map]
        cols = [g.assign(f"{starts}[..., {j}]") for j in range(len(index_map))]
        valid = " & ".join(f"({c} >= 0) & ({c} <= {h})" for c, h in zip(cols, his))
        out = g.assign(f"{x}[{', '.join(f'torch.clamp({c}, 0, {h})' for c, h in zip(cols, his))}]")
    else:
        window_axes = {d: nb + k for k, d in enumerate(window)}
        idx, valid = _point_indices(g, starts, op.shape, index_map, dict(enumerate(sizes)), window_axes,
                                    batching, nb, rank)
        out = g.assign(f"{x}[{', '.join(idx)}]")
        if not index_map and not batching:
            out = g.assign(f"{out}.expand({g.shape(idx_aval.shape[:-1] + tuple(sizes[d] for d in window))})")
    if _mode(eqn) == "FILL_OR_DROP" and valid:
        fill = _fill_value(g, eqn, op.dtype)
        out = g.assign(f"torch.where({_batch_to(g, f'({valid})', len(window))}, {out}, {fill})")
    return [_to_output(g, out, nb, tuple(dn.offset_dims), rank)]


_SCATTER = {"scatter-add": "add", "scatter_add": "add", "scatter-sub": "sub", "scatter_sub": "sub",
            "scatter": "set", "scatter-mul": "prod", "scatter_mul": "prod", "scatter-min": "amin",
            "scatter_min": "amin", "scatter-max": "amax", "scatter_max": "amax"}


def _scatter(g: Emitter, eqn, ins) -> list[str]:
    dn, kind = eqn.params["dimension_numbers"], _SCATTER[eqn.primitive.name]
    op, idx_aval, upd_aval = (v.aval for v in eqn.invars)
    x, starts, upd = g.t(ins[0]), g.assign(f"{g.t(ins[1])}.to(torch.int64)"), g.t(ins[2])
    uwd, inserted = tuple(dn.update_window_dims), tuple(dn.inserted_window_dims)
    batching = dict(zip(dn.operand_batching_dims, dn.scatter_indices_batching_dims))
    window = [d for d in range(op.ndim) if d not in inserted and d not in batching]
    nb, rank = idx_aval.ndim - 1, upd_aval.ndim
    perm = [a for a in range(rank) if a not in uwd] + list(uwd)
    if perm != list(range(rank)):
        upd = g.assign(f"{upd}.permute({int_list(perm)})")
    if kind == "sub":
        upd, kind = g.assign(f"-{upd}"), "add"
    sizes = {d: 1 for d in range(op.ndim)}
    sizes.update({d: upd_aval.shape[a] for d, a in zip(window, uwd)})
    index_map = tuple(dn.scatter_dims_to_operand_dims)
    window_axes = {d: nb + k for k, d in enumerate(window)}
    idx, valid = _point_indices(g, starts, op.shape, index_map, sizes, window_axes, batching, nb, rank)
    lin, stride = [], "1"
    for d in range(op.ndim - 1, -1, -1):
        lin.append(idx[d] if stride == "1" else f"{idx[d]} * {stride}")
        stride = g.dim(op.shape[d]) if stride == "1" else f"{stride} * {g.dim(op.shape[d])}"
    flat_shape = g.shape(upd_aval.shape[a] for a in perm)
    lin = g.assign(f"({' + '.join(lin)}).expand({flat_shape}).reshape([-1])")
    flat = g.assign(f"{x}.reshape([-1])")
    drop = _mode(eqn) == "FILL_OR_DROP" and valid
    if drop:  # out-of-bounds windows go to one extra slot that is cut off afterwards
        keep = g.assign(f"({_batch_to(g, f'({valid})', len(window))}).expand({flat_shape}).reshape([-1])")
        lin = g.assign(f"torch.where({keep}, {lin}, {stride})")
        flat = g.assign(f"torch.cat([{flat}, {flat}.new_zeros([1])])")
    src = f"{upd}.reshape([-1])"
    if kind == "add":
        out = f"{flat}.index_add(0, {lin}, {src})"
    elif kind == "set":
        out = f"{flat}.scatter(0, {lin}, {src})"
    else:
        out = f'{flat}.scatter_reduce(0, {lin}, {src}, "{kind}", include_self=True)'
    out = g.assign(out)
    if drop:
        out = g.assign(f"{out}[:{stride}]")
    return [f"{out}.reshape({g.shape(op.shape)})"]


def _clamped_start(g: Emitter, start: Any, size: Any, window: Any) -> str:
    s = g.s(start) if not isinstance(start, str) else f"int({start})"
    return f"max(0, min({s}, {g.dim(size)} - {g.dim(window)}))"


def _dynamic_slice(g: Emitter, eqn, ins) -> list[str]:
    x, shape = g.t(ins[0]), eqn.invars[0].aval.shape
    for d, (start, size, win) in enumerate(zip(ins[1:], shape, eqn.params["slice_sizes"])):
        if not same_dim(size, win):
            x = g.assign(f"{x}.narrow({d}, {_clamped_start(g, start, size, win)}, {g.dim(win)})")
    return [x]


def _dynamic_update_slice(g: Emitter, eqn, ins) -> list[str]:
    x, upd = g.t(ins[0]), g.t(ins[1])
    shape, win = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    index = []
    for start, size, w in zip(ins[2:], shape, win):
        s = g.assign(_clamped_start(g, start, size, w), "s")
        index.append(f"{s}:{s} + {g.dim(w)}")
    out = g.assign(f"{x}.clone()")
    g.emit(f"{out}[{', '.join(index)}] = {upd}")
    return [out]


def _pad(g: Emitter, eqn, ins) -> list[str]:
    x, config = g.t(ins[0]), eqn.params["padding_config"]
    value = g.s(ins[1]) if not isinstance(ins[1], str) else f"{ins[1]}.item()"
    shape = eqn.invars[0].aval.shape
    if any(int(i) for _, _, i in config):
        dilated = [f"{g.dim(s)} + ({g.dim(s)} - 1) * {int(i)}" for s, (_, _, i) in zip(shape, config)]
        z = g.assign(f"torch.full([{', '.join(dilated)}], {value}, dtype={x}.dtype, device={x}.device)")
        g.emit(f"{z}[{', '.join(f'::{int(i) + 1}' for _, _, i in config)}] = {x}")
        x = z
    pairs = [(g.dim(lo), g.dim(hi)) for lo, hi, _ in config]
    if all(p == ("0", "0") for p in pairs):
        return [x]
    return [f"torch.constant_pad_nd({x}, {torch_pad(pairs)}, {value})"]


_WINDOW_INIT = {"reduce_window_sum": "0.0", "reduce_window_max": 'float("-inf")', "reduce_window_min": 'float("inf")'}


def _reduce_window(g: Emitter, eqn, ins) -> list[str]:
    p, name = eqn.params, eqn.primitive.name
    if any(int(d) != 1 for d in p["base_dilation"]):
        raise Unsupported("with base_dilation != 1 is not supported")
    x, dtype = g.t(ins[0]), eqn.invars[0].aval.dtype
    init = _WINDOW_INIT[name]
    if not np.issubdtype(dtype, np.inexact):
        init = "0" if name == "reduce_window_sum" else str(getattr(np.iinfo(dtype), "min" if "max" in name else "max"))
    pads = [(g.dim(lo), g.dim(hi)) for lo, hi in p["padding"]]
    if any(pair != ("0", "0") for pair in pads):
        x = g.assign(f"torch.constant_pad_nd({x}, {torch_pad(pads)}, {init})")
    pooled = _pool2d(x, name, eqn.invars[0].aval, p)
    if pooled is not None:
        return [pooled]
    reduced = []
    for d, (win, stride, dil) in enumerate(zip(p["window_dimensions"], p["window_strides"], p["window_dilation"])):
        win, stride, dil = int(win), int(stride), int(dil)
        if win == 1 and stride == 1:
            continue
        x = g.assign(f"{x}.unfold({d}, {(win - 1) * dil + 1}, {stride})")
        if dil != 1:
            x = g.assign(f"{x}[..., ::{dil}]")
        reduced.append(-1 - len(reduced))
    if not reduced:
        return [x]
    fn = {"reduce_window_sum": "torch.sum", "reduce_window_max": "torch.amax", "reduce_window_min": "torch.amin"}
    return [f"{fn[name]}({x}, {int_list(reduced)})"]


def _pool2d(x: str, name: str, aval: Any, p: dict) -> str | None:
    """A float sum/max window over dims (1, 2) (NHWC, flax's pools) or (2, 3) (NCHW) of a 4-d tensor, padding
    already applied, as one native pooling kernel: unfold + sum reads each element once per window."""
    windows, strides = [int(w) for w in p["window_dimensions"]], [int(s) for s in p["window_strides"]]
    spatial = [d for d in range(aval.ndim) if (windows[d], strides[d]) != (1, 1)]
    if (aval.ndim != 4 or name == "reduce_window_min" or not np.issubdtype(aval.dtype, np.floating)
            or any(int(d) != 1 for d in p["window_dilation"]) or not spatial
            or not (set(spatial) <= {1, 2} or set(spatial) <= {2, 3})):
        return None
    dims = (2, 3) if set(spatial) <= {2, 3} else (1, 2)
    kernel, stride = int_list(windows[d] for d in dims), int_list(strides[d] for d in dims)
    if dims == (1, 2):  # NHWC → NCHW is a view here: conv outputs are NCHW in memory (see `_conv`)
        x = f"{x}.permute([0, 3, 1, 2])"
    if name == "reduce_window_sum":  # divisor 1: the exact window sum, not a mean
        out = f"torch.nn.functional.avg_pool2d({x}, {kernel}, {stride}, [0, 0], False, True, 1)"
    else:
        out = f"torch.max_pool2d({x}, {kernel}, {stride}, [0, 0], [1, 1], False)"
    return f"{out}.permute([0, 2, 3, 1])" if dims == (1, 2) else out


_CUMULATIVE = {"cumsum": "torch.cumsum({x}, {a}{dt})", "cumprod": "torch.cumprod({x}, {a}{dt})",
               "cummax": "torch.cummax({x}, {a})[0]", "cummin": "torch.cummin({x}, {a})[0]",
               "cumlogsumexp": "torch.logcumsumexp({x}, {a})"}


def _cumulative(g: Emitter, eqn, ins) -> list[str]:
    x, a = g.t(ins[0]), int(eqn.params["axis"])
    dtype = eqn.outvars[0].aval.dtype
    dt = "" if np.issubdtype(dtype, np.inexact) else f", dtype={g.dtype(dtype)}"
    if eqn.params["reverse"]:
        x = g.assign(f"torch.flip({x}, [{a}])")
    out = _CUMULATIVE[eqn.primitive.name].format(x=x, a=a, dt=dt)
    return [f"torch.flip({g.assign(out)}, [{a}])" if eqn.params["reverse"] else out]


def _sort(g: Emitter, eqn, ins) -> list[str]:
    if eqn.params["num_keys"] != 1:
        raise Unsupported("with more than one sort key is not supported")
    d = int(eqn.params["dimension"])
    pair = g.assign(f"torch.sort({g.t(ins[0])}, dim={d}, stable=True)")
    order = g.assign(f"{pair}[1]")
    return [f"{pair}[0]"] + [f"torch.gather({g.t(x)}, {d}, {order})" for x in ins[1:]]


def _top_k(g: Emitter, eqn, ins) -> list[str]:
    axis = int(eqn.params.get("axis", eqn.invars[0].aval.ndim - 1))
    pair = g.assign(f"torch.topk({g.t(ins[0])}, {int(eqn.params['k'])}, {axis})")
    return [f"{pair}[0]", f"{pair}[1].to({g.dtype(eqn.outvars[1].aval.dtype)})"]


RULES: dict[str, Rule] = rule_table(
    {"gather": _gather},
    dict.fromkeys(_SCATTER, _scatter),
    {"dynamic_slice": _dynamic_slice, "dynamic_update_slice": _dynamic_update_slice, "pad": _pad},
    dict.fromkeys(_WINDOW_INIT, _reduce_window),
    dict.fromkeys(_CUMULATIVE, _cumulative),
    {"sort": _sort, "top_k": _top_k},
)
