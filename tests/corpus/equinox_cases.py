"""equinox: MLP, a pre-norm transformer block with a causal `jnp.tril` bool mask, a GRU cell scanned over time,
and a Conv2d network; fn(params, x) with params = eqx.partition(model, eqx.is_array)[0]."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from . import Case, cast, case, np_dtype, rng


def _split(model, dtype):
    params, static = eqx.partition(model, eqx.is_array)
    return cast(params, dtype), static


def _x(dtype, seed, *shape):
    return rng(seed).standard_normal(shape).astype(np_dtype(dtype))


@case("eqx_mlp", dtypes=("float32", "float64", "bfloat16"))
def mlp(dtype):
    params, static = _split(eqx.nn.MLP(5, 3, width_size=16, depth=2, activation=jax.nn.softplus,
                                       key=jax.random.PRNGKey(0)), dtype)

    def fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)
    return Case("", fn, params, (_x(dtype, 1, 3, 5),), (_x(dtype, 2, 8, 5),), [{0: "batch"}])


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, dim, heads, key):
        k1, k2 = jax.random.split(key)
        self.norm1, self.norm2 = eqx.nn.LayerNorm(dim), eqx.nn.LayerNorm(dim)
        self.attn = eqx.nn.MultiheadAttention(heads, dim, key=k1)
        self.mlp = eqx.nn.MLP(dim, dim, 2 * dim, 1, activation=jax.nn.gelu, key=k2)

    def __call__(self, x):  # (seq, dim)
        mask = jnp.tril(jnp.ones((x.shape[0], x.shape[0]), bool))
        h = jax.vmap(self.norm1)(x)
        x = x + self.attn(h, h, h, mask=mask)
        return x + jax.vmap(self.mlp)(jax.vmap(self.norm2)(x))


@case("eqx_transformer_block")
def transformer_block(dtype):
    params, static = _split(Block(16, 2, jax.random.PRNGKey(1)), dtype)

    def fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)
    return Case("", fn, params, (_x(dtype, 3, 2, 5, 16),), (_x(dtype, 4, 3, 9, 16),), [{0: "batch", 1: "seq"}])


@case("eqx_gru_scan")
def gru_scan(dtype):
    params, static = _split(eqx.nn.GRUCell(4, 8, key=jax.random.PRNGKey(2)), dtype)

    def fn(p, xs):  # (batch, time, features) -> final hidden state
        cell = eqx.combine(p, static)

        def one(seq):
            def step(h, x):
                h = cell(x, h)
                return h, h
            h, _ = jax.lax.scan(step, jnp.zeros((8,), seq.dtype), seq)
            return h
        return jax.vmap(one)(xs)
    return Case("", fn, params, (_x(dtype, 5, 2, 6, 4),), (_x(dtype, 6, 3, 11, 4),), [{0: "batch", 1: "time"}])


@case("eqx_conv")
def conv(dtype):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    model = [eqx.nn.Conv2d(2, 6, 3, padding=1, key=k1), eqx.nn.Conv2d(6, 4, 3, stride=2, key=k2),
             eqx.nn.Linear(4, 3, key=k3)]
    params, static = _split(model, dtype)

    def fn(p, x):  # (batch, channels, 10, 10)
        c1, c2, lin = eqx.combine(p, static)

        def one(img):
            h = jax.nn.relu(c1(img))
            h = jnp.tanh(c2(h))
            return lin(jnp.mean(h, axis=(1, 2)))
        return jax.vmap(one)(x)
    return Case("", fn, params, (_x(dtype, 7, 2, 2, 10, 10),), (_x(dtype, 8, 5, 2, 10, 10),), [{0: "batch"}])
