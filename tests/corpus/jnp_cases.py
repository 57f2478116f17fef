"""Plain jax.numpy / lax functions: scans and loops, sorting, segment sums, masks, a saturated network."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from . import Case, cast, case, np_dtype, rng


def _x(dtype, seed, *shape):
    return rng(seed).standard_normal(shape).astype(np_dtype(dtype))


@case("jnp_cumsum_where")
def cumsum_where(dtype):
    def fn(p, x):
        c = jnp.cumsum(x * p["w"], axis=1)
        return jnp.where(c > 0.0, c, 0.1 * c) + jnp.where(x < -1.0, jnp.exp(x), x * x)
    params = cast({"w": rng(1).standard_normal((7,))}, dtype)
    return Case("", fn, params, (_x(dtype, 2, 3, 7),), (_x(dtype, 3, 5, 7),), [{0: "batch"}])


@case("jnp_sort")
def sort(dtype):
    def fn(p, x):
        s = jnp.sort(x * p["w"], axis=-1)
        return s * jnp.arange(1, x.shape[-1] + 1, dtype=x.dtype), jnp.argsort(x, axis=-1)
    params = cast({"w": rng(4).standard_normal((6,))}, dtype)
    return Case("", fn, params, (_x(dtype, 5, 2, 6),), (_x(dtype, 6, 4, 6),), [{0: "batch"}])


@case("jnp_top_k")
def top_k(dtype):
    def fn(p, x):
        values, indices = lax.top_k(x @ p["w"], 3)
        return jax.nn.softmax(values, axis=-1), indices
    params = cast({"w": rng(7).standard_normal((5, 8))}, dtype)
    return Case("", fn, params, (_x(dtype, 8, 2, 5),), (_x(dtype, 9, 6, 5),), [{0: "batch"}])


@case("jnp_fori_loop")
def fori_loop(dtype):
    def fn(p, x):
        def body(i, h):
            return jnp.tanh(h @ p["w"] + p["b"] * i.astype(h.dtype))
        return lax.fori_loop(0, 5, body, x)
    params = cast({"w": 0.5 * rng(10).standard_normal((4, 4)), "b": rng(11).standard_normal((4,))}, dtype)
    return Case("", fn, params, (_x(dtype, 12, 2, 4),), (_x(dtype, 13, 7, 4),), [{0: "batch"}])


@case("jnp_scan_rnn")
def scan(dtype):
    def fn(p, xs):  # xs: (time, batch, features)
        def step(h, x):
            h = jnp.tanh(x @ p["wx"] + h @ p["wh"])
            return h, h.sum(-1)
        h0 = jnp.zeros((xs.shape[1], 6), xs.dtype)
        h, ys = lax.scan(step, h0, xs)
        return h, ys
    params = cast({"wx": rng(14).standard_normal((3, 6)), "wh": 0.3 * rng(15).standard_normal((6, 6))}, dtype)
    return Case("", fn, params, (_x(dtype, 16, 4, 2, 3),), (_x(dtype, 17, 9, 5, 3),), [{0: "time", 1: "batch"}])


@case("jnp_while_loop")
def while_loop(dtype):
    def fn(p, x):  # Newton iterations for sqrt(a), a fixed number of times by a counter in the carry
        a = x * x + p["c"]
        def cond(carry):
            return carry[0] < 6
        def body(carry):
            i, y = carry
            return i + 1, 0.5 * (y + a / y)
        return lax.while_loop(cond, body, (0, jnp.ones_like(a)))[1]
    params = cast({"c": rng(18).uniform(0.5, 2.0, (3,))}, dtype)
    return Case("", fn, params, (_x(dtype, 19, 2, 3),), (_x(dtype, 20, 5, 3),), [{0: "batch"}])


@case("jnp_cond")
def cond(dtype):
    def fn(p, x):
        return lax.cond(jnp.sum(x) > 0.0, lambda v: jnp.sin(v @ p["w"]), lambda v: jnp.cos(v @ p["w"]) * 2.0, x)
    params = cast({"w": rng(21).standard_normal((4, 3))}, dtype)
    x1 = _x(dtype, 22, 2, 4)
    x2 = -abs(_x(dtype, 23, 5, 4)) if float(x1.astype("float32").sum()) > 0 else abs(_x(dtype, 23, 5, 4))
    return Case("", fn, params, (x1,), (x2,), [{0: "batch"}])  # the two sizes take different branches


@case("jnp_segment_sum")
def segment_sum(dtype):
    def fn(p, x, seg):  # per-graph sums of per-node features, 4 graphs
        node = jnp.tanh(x @ p["w"])
        return jax.ops.segment_sum(node, seg, num_segments=4) @ p["v"]
    params = cast({"w": rng(24).standard_normal((3, 5)), "v": rng(25).standard_normal((5, 2))}, dtype)
    seg1 = rng(26).integers(0, 4, (6,)).astype("int32")
    seg2 = rng(27).integers(0, 4, (11,)).astype("int32")
    return Case("", fn, params, (_x(dtype, 28, 6, 3), seg1), (_x(dtype, 29, 11, 3), seg2),
                [{0: "nodes"}, {0: "nodes"}])


@case("jnp_saturated_tanh", dtypes=("float32", "float64", "bfloat16"))
def saturated_tanh(dtype):
    def fn(p, x):  # hidden units saturate at +-1, so the outputs (and their gradients) are all ~0
        h = jnp.tanh(x @ p["w1"])
        return (1.0 - h * h) @ p["w2"]
    params = cast({"w1": 40.0 * rng(30).standard_normal((4, 8)), "w2": rng(31).standard_normal((8, 3))}, dtype)
    x1 = (_x("float32", 32, 3, 4) + 3.0).astype(np_dtype(dtype))
    x2 = (_x("float32", 33, 6, 4) - 3.0).astype(np_dtype(dtype))
    return Case("", fn, params, (x1,), (x2,), [{0: "batch"}])


@case("jnp_safe_sqrt_pairs")
def safe_sqrt_pairs(dtype):
    def fn(p, r):  # a pair energy with the zero self-distance masked by the double-where trick
        d2 = jnp.sum((r[:, None, :] - r[None, :, :]) ** 2, axis=-1)
        mask = d2 > 0.0
        d = jnp.where(mask, jnp.sqrt(jnp.where(mask, d2, 1.0)), 0.0)
        e = jnp.where(mask, p["a"] * jnp.exp(-d / p["s"]) / jnp.where(mask, d, 1.0), 0.0)
        return 0.5 * jnp.sum(e)
    params = cast({"a": 2.0 * jnp.ones(()), "s": 0.7 * jnp.ones(())}, dtype)
    return Case("", fn, params, (3.0 * _x(dtype, 34, 5, 3),), (3.0 * _x(dtype, 35, 9, 3),), [{0: "atoms"}],
                with_forces=True)


@case("jnp_logsumexp_mask")
def logsumexp_mask(dtype):
    def fn(p, x, valid):  # masked log-softmax over a padded axis, as in a loss on ragged sequences
        logits = x @ p["w"]
        logits = jnp.where(valid[..., None], logits, -jnp.inf)
        return jax.nn.logsumexp(logits, axis=1), jnp.max(logits, axis=1)
    params = cast({"w": rng(36).standard_normal((3, 4))}, dtype)
    v1 = rng(37).random((2, 5)) < 0.7
    v1[:, 0] = True
    v2 = rng(38).random((3, 8)) < 0.7
    v2[:, 0] = True
    return Case("", fn, params, (_x(dtype, 39, 2, 5, 3), v1), (_x(dtype, 40, 3, 8, 3), v2),
                [{0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}])
