"""Peephole fusion of dot-product attention → `torch.nn.functional.scaled_dot_product_attention`.

Matched: `softmax(where(mask, (q·kᵀ) * scale, fill)) · v` over 4-d operands with two batch dims (batch,
heads) in any layout, as trainkit's transformer and flax's `dot_product_attention` trace it: the scale
multiplies (or divides) the scores or the query, the mask is optional, and `jnp.where` may arrive wrapped in
its `jit`. A causal mask built from `arange(t)[:, None] >= arange(s)[None, :]` becomes `is_causal=True`; any
other mask an additive float mask (0 where kept, `fill` elsewhere), which reproduces `where` exactly, fully
masked rows included.
"""

from __future__ import annotations

from typing import Any

from jax._src import core

from trainkit.export.torchscript.emitter import int_list, same_dim
from trainkit.export.torchscript.fusion.graph import Graph, literal_is, with_literal
from trainkit.export.torchscript.fusion.native import softmax_of


def _scaled(g: Graph, v: object) -> tuple[object, float, list] | None:
    """`v = x * c` or `x / c` with a scalar literal c → (x, factor, [eqn])."""
    for name in ("mul", "div"):
        eqn = g.op(v, name)
        if eqn is None:
            continue
        for x, c in ((eqn.invars[0], eqn.invars[1]), (eqn.invars[1], eqn.invars[0])):
            if isinstance(c, core.Literal) and not c.aval.shape and (name == "mul" or c is eqn.invars[1]):
                return x, float(c.val) if name == "mul" else 1.0 / float(c.val), [eqn]
    return None


def _where_parts(eqn: core.JaxprEqn) -> tuple | None:
    """`select_n(broadcast(pred), broadcast(fill), x)` (inside `jnp.where`'s jit or not) → (pred, the test that
    makes it boolean, bdims of pred in x, fill literal, x), in the variables of the jaxpr that holds `eqn`."""
    outer = dict(zip(eqn.params["jaxpr"].jaxpr.invars, eqn.invars)) if eqn.primitive.name in ("jit", "pjit") else {}
    body = eqn.params["jaxpr"].jaxpr if outer else None
    if body is not None:
        if len(body.eqns) > 4 or body.eqns[-1].primitive.name != "select_n" or body.outvars[0] is not \
                body.eqns[-1].outvars[0]:
            return None
        select, producer = body.eqns[-1], {v: e for e in body.eqns for v in e.outvars}
    elif eqn.primitive.name == "select_n":
        select, producer = eqn, {}
    else:
        return None
    if len(select.invars) != 3:
        return None
    pred, fill, x = select.invars

    def unbroadcast(v: Any) -> tuple[Any, tuple]:
        b = producer.get(v)
        if b is not None and b.primitive.name == "broadcast_in_dim":
            return b.invars[0], tuple(b.params["broadcast_dimensions"])
        return v, tuple(range(len(v.aval.shape)))

    pred, dims = unbroadcast(pred)
    nonzero = producer.get(pred)  # a float mask (flax's make_attention_mask): where(mask != 0, ...)
    if nonzero is not None and nonzero.primitive.name == "ne" and literal_is(nonzero.invars[1], 0.0):
        pred = nonzero.invars[0]
    fill, _ = unbroadcast(fill)
    test = " != 0" if pred.aval.dtype != bool else ""
    pred, fill, x = (outer.get(v, v) if outer else v for v in (pred, fill, x))
    if (any(v in producer for v in (pred, x)) or not isinstance(fill, core.Literal) or fill.aval.shape
            or isinstance(pred, core.Literal)):
        return None
    return pred, test, dims, fill, x


def _causal(g: Graph, pred: object, dims: tuple, scores: core.Var) -> list | None:
    """`pred` = arange(t)[:, None] >= arange(s)[None, :] over the (query, key) dims → its equations."""
    cmp = g.op(pred, "ge") or g.op(pred, "le")
    if cmp is None or dims != (2, 3) or not all(same_dim(a, b) for a, b in zip(pred.aval.shape, scores.aval.shape[2:])):
        return None
    rows, cols = cmp.invars if cmp.primitive.name == "ge" else cmp.invars[::-1]
    chain = [cmp]
    for v, axis in ((rows, 0), (cols, 1)):
        b = g.op(v, "broadcast_in_dim")
        if b is None or tuple(b.params["broadcast_dimensions"]) != (axis,):
            return None
        chain.append(b)
        v = b.invars[0]
        for name, identity in (("add", 0), ("mul", 1)):  # arange over a symbolic size: iota * 1 + 0
            if with_literal(g, v, name, identity) is not None:
                chain.append(g.producer[v])
                v = with_literal(g, v, name, identity)
        iota = g.op(v, "iota")
        if iota is None or iota.params["dimension"] != 0:
            return None
        chain.append(iota)
    return chain


def _free(ndim: int, *used: tuple) -> int | None:
    rest = [d for d in range(ndim) if all(d not in u for u in used)]
    return rest[0] if len(rest) == 1 else None


def match_attention(g: Graph, root: core.JaxprEqn) -> tuple | None:
    """`root` = the dot_general of softmax(scores) with v → one `scaled_dot_product_attention`."""
    (lc, rc), (lb, rb) = root.params["dimension_numbers"]
    for side in (0, 1):
        weights, v = root.invars[side], root.invars[1 - side]
        wc, vc, wb, vb = (lc, rc, lb, rb) if side == 0 else (rc, lc, rb, lb)
        soft = g.op(weights, "div")
        found = softmax_of(g, soft) if soft is not None else None
        if found is None or tuple(wc) != (3,) or tuple(wb) != (0, 1) or weights.aval.ndim != 4 or v.aval.ndim != 4:
            continue
        scores, axis, chain = found
        v_free = _free(4, vb, vc)
        if axis != 3 or v_free is None:
            continue
        mask = None
        producer = g.producer.get(scores)
        where = _where_parts(producer) if producer is not None else None
        if where is not None:
            pred, test, dims, fill, scores = where
            if list(dims) != sorted(dims):
                continue
            chain.append(producer)
            causal = _causal(g, pred, dims, scores) if not test else None
            mask = ("causal", causal) if causal is not None else (pred, test, dims, fill)
        qk = _scores(g, scores)
        if qk is None:
            continue
        q, k, q_perm, k_perm, scale, qk_chain = qk
        dtypes = {x.aval.dtype for x in (q, k, v, root.outvars[0])}
        if len(dtypes) != 1 or not all(e.params.get("preferred_element_type") in (None, *dtypes)
                                       for e in (root, qk_chain[0])):
            continue
        chain += qk_chain + [root]
        inputs = [q, k, v]
        if mask is not None and mask[0] == "causal":
            chain += _exclusive(g, chain, mask[1])
        elif mask is not None:
            inputs.append(mask[0])
        v_perm = [*vb, *vc, v_free]
        out_perm = [0, 1, 2, 3] if side == 0 else [0, 1, 3, 2]
        return inputs, chain, _emit(q_perm, k_perm, v_perm, out_perm, scale, mask)
    return None


def _scores(g: Graph, v: object) -> tuple | None:
    """`v = (q·kᵀ) * scale` or `(q * scale)·kᵀ` with (batch, heads) batch dims → q, k, their permutations to
    (batch, heads, seq, channel), scale, equations."""
    chain, scale = [], 1.0
    scaled = _scaled(g, v)
    if scaled is not None:
        v, scale, chain = scaled
    dot = g.op(v, "dot_general")
    if dot is None or v.aval.ndim != 4:
        return None
    (lc, rc), (lb, rb) = dot.params["dimension_numbers"]
    q, k = dot.invars
    if q.aval.ndim != 4 or k.aval.ndim != 4 or len(lc) != 1 or len(lb) != 2:
        return None
    q_free, k_free = _free(4, lb, lc), _free(4, rb, rc)
    chain.append(dot)
    if len(chain) == 1:
        pre = _scaled(g, q)
        if pre is not None and g.uses[q] == 1:  # flax scales the query
            q, scale, pre_chain = pre
            chain = pre_chain + chain
    if q_free is None or k_free is None:
        return None
    return q, k, [*lb, q_free, *lc], [*rb, k_free, *rc], scale, chain[::-1]


def _exclusive(g: Graph, chain: list, candidates: list) -> list:
    """The candidate equations (consumers first) whose outputs are used only inside the chain."""
    taken = list(chain)
    for eqn in candidates:
        inside = sum(1 for e in taken for x in e.invars if x is eqn.outvars[0])
        if g.uses[eqn.outvars[0]] == inside:
            taken.append(eqn)
    return taken[len(chain):]


def _emit(q_perm: list, k_perm: list, v_perm: list, out_perm: list, scale: float, mask: tuple | None):
    def permuted(x: str, perm: list) -> str:
        return x if perm == list(range(4)) else f"{x}.permute({int_list(perm)})"

    def emit(g: Any, a: list[str]) -> str:
        q, k, v = permuted(a[0], q_perm), permuted(a[1], k_perm), permuted(a[2], v_perm)
        attn_mask, causal = "None", mask is not None and mask[0] == "causal"
        if mask is not None and not causal:
            _, test, dims, fill = mask
            m = a[3] + "".join(f".unsqueeze({d})" for d in range(4) if d not in dims) + test
            m = g.assign(m)  # the fill made in the query's dtype: -1.8e308 overflows a float32 intermediate
            attn_mask = g.assign(f"torch.full_like({m}, {g.scalar(fill)}, dtype={a[0]}.dtype).masked_fill({m}, 0.0)")
        out = (f"torch.nn.functional.scaled_dot_product_attention({q}, {k}, {v}, {attn_mask}, 0.0, {causal}, "
               f"scale={scale!r})")
        return permuted(out, out_perm)
    return emit
