"""flax's own layers. linen: Dense/Conv/LayerNorm/BatchNorm (eval)/Dropout (deterministic), nn.RNN with an
LSTMCell, a bidirectional GRU, self-attention. nnx: a module with BatchNorm and Dropout in eval mode, called as
fn(state, x) through nnx.split/merge."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from . import Case, cast, case, np_dtype, rng


def _x(dtype, seed, *shape):
    return rng(seed).standard_normal(shape).astype(np_dtype(dtype))


def _linen(model, dtype, x1, x2, axes, **apply_kw):
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x1, jnp.float32), **apply_kw)
    variables = cast(variables, dtype)
    if "batch_stats" in variables:  # non-trivial running statistics, as after training
        variables = dict(variables)
        variables["batch_stats"] = jax.tree.map(
            lambda a: (a + 0.3 * jnp.asarray(rng(a.size).standard_normal(a.shape))).astype(a.dtype)
            if a.ndim else a, variables["batch_stats"])
        variables["batch_stats"] = jax.tree.map(jnp.abs, variables["batch_stats"])

    def fn(v, x):
        return model.apply(v, x, **apply_kw)
    return Case("", fn, variables, (x1,), (x2,), axes)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32)(x))
        x = nn.LayerNorm()(x)
        x = nn.Dropout(0.2, deterministic=True)(x)
        return nn.Dense(4)(nn.silu(nn.Dense(16)(x)))


@case("flax_mlp_layernorm_dropout", dtypes=("float32", "float64", "bfloat16"))
def mlp(dtype):
    return _linen(MLP(), dtype, _x(dtype, 1, 3, 6), _x(dtype, 2, 7, 6), [{0: "batch"}])


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), strides=(2, 2), feature_group_count=2)(x)
        x = nn.avg_pool(nn.swish(x), (2, 2), strides=(2, 2))
        return nn.Dense(5)(x.reshape(x.shape[0], -1))


@case("flax_cnn_batchnorm")
def cnn(dtype):
    return _linen(CNN(), dtype, _x(dtype, 3, 2, 12, 12, 3), _x(dtype, 4, 5, 12, 12, 3), [{0: "batch"}])


class LSTM(nn.Module):
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):  # the carry is created in param_dtype
        return nn.Dense(2)(nn.RNN(nn.LSTMCell(12, param_dtype=self.dtype))(x))


@case("flax_rnn_lstm")
def lstm(dtype):
    return _linen(LSTM(dtype), dtype, _x(dtype, 5, 2, 6, 3), _x(dtype, 6, 4, 10, 3), [{0: "batch", 1: "time"}])


class BiGRU(nn.Module):
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        cell = dict(features=8, param_dtype=self.dtype)
        h = nn.Bidirectional(nn.RNN(nn.GRUCell(**cell)), nn.RNN(nn.GRUCell(**cell)))(x)
        return nn.Dense(3)(h)


@case("flax_bidirectional_gru")
def bigru(dtype):
    return _linen(BiGRU(dtype), dtype, _x(dtype, 7, 2, 5, 4), _x(dtype, 8, 3, 9, 4), [{0: "batch", 1: "time"}])


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        h = nn.SelfAttention(num_heads=4, qkv_features=16, deterministic=True)(nn.LayerNorm()(x), mask=mask)
        return x + h


@case("flax_causal_self_attention")
def attention(dtype):
    return _linen(Attention(), dtype, _x(dtype, 9, 2, 5, 16), _x(dtype, 10, 3, 8, 16), [{0: "batch", 1: "seq"}])


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.lin1 = nnx.Linear(6, 24, rngs=rngs)
        self.bn = nnx.BatchNorm(24, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.lin2 = nnx.Linear(24, 3, rngs=rngs)

    def __call__(self, x):
        return self.lin2(self.drop(nnx.relu(self.bn(self.lin1(x)))))


@case("flax_nnx_batchnorm_dropout_eval")
def nnx_eval(dtype):
    model = NNXNet(nnx.Rngs(0))
    model.bn.mean.value = jnp.asarray(0.2 * rng(11).standard_normal((24,)), jnp.float32)
    model.bn.var.value = jnp.asarray(rng(12).uniform(0.5, 2.0, (24,)), jnp.float32)
    model.eval()
    graphdef, state = nnx.split(model)
    state = cast(state, dtype)

    def fn(s, x):
        return nnx.merge(graphdef, s)(x)
    return Case("", fn, state, (_x(dtype, 13, 3, 6),), (_x(dtype, 14, 8, 6),), [{0: "batch"}])
