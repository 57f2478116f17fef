"""The TorchScript converter primitive by primitive: values on other sizes than the export example, and
gradients (torch autograd through the module vs `jax.grad`) at the kinks where naive translations differ.

Many functions share one export (one output each) so the file stays fast.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from trainkit.export.torchscript import parity, to_torchscript

RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
rng = np.random.default_rng(0)


@jax.custom_jvp
def straight_through_round(x):
    return jnp.round(x)


straight_through_round.defjvp(lambda primals, tangents: (jnp.round(primals[0]), tangents[0]))


@jax.custom_jvp
def safe_norm(x):
    return jnp.sqrt(jnp.sum(x * x, axis=-1))


@safe_norm.defjvp
def _safe_norm_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    n = safe_norm(x)
    return n, jnp.sum(x * t, axis=-1) / jnp.where(n == 0, 1.0, n)


@jax.custom_vjp
def clip_gradient(x):
    return x


clip_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1.0, 1.0),))


def _sqrt_where(x):
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


# Each takes a (batch, 3) block; the kink values 0, 1, 6 appear in the inputs below.
GRADIENT_FNS = {
    "relu": jax.nn.relu, "relu6": lambda x: jax.nn.relu6(6 * x), "silu": jax.nn.silu,
    "softplus": jax.nn.softplus, "gelu_tanh": jax.nn.gelu, "gelu_erf": lambda x: jax.nn.gelu(x, approximate=False),
    "elu": jax.nn.elu, "celu": jax.nn.celu, "selu": jax.nn.selu, "mish": jax.nn.mish, "leaky": jax.nn.leaky_relu,
    "hard_tanh": jax.nn.hard_tanh, "logsumexp": lambda x: jax.nn.logsumexp(x, axis=-1, keepdims=True),
    "softmax": lambda x: jax.nn.softmax(x) * jnp.arange(3.0), "log_softmax": jax.nn.log_softmax,
    "logaddexp": lambda x: jnp.logaddexp(x, x[:, :1]), "clip_at_bounds": lambda x: jnp.clip(x, 0.0, 1.0),
    "abs_at_0": jnp.abs, "max_tie": lambda x: jnp.maximum(x, 0.0), "sinc_at_0": jnp.sinc,
    "custom_jvp_user_rule": straight_through_round, "custom_jvp_safe_norm": lambda x: safe_norm(x)[:, None],
    "sqrt_double_where": _sqrt_where, "norm": lambda x: jnp.linalg.norm(x + 1.0, axis=-1, keepdims=True),
    "max_reduce_ties": lambda x: jnp.max(x, axis=1, keepdims=True),
    "sort": lambda x: jnp.sort(x, axis=1) * jnp.arange(3.0),
    "std": lambda x: jnp.std(x, axis=0, keepdims=True) * x, "pow": lambda x: jnp.abs(x) ** 1.5,
    "take": lambda x: jnp.take(x, jnp.array([2, 0, 1]), axis=1) * x, "tanh": jnp.tanh, "erf": jax.scipy.special.erf,
}
KINKS = np.array([[0.0, 1.0, -1.0], [0.5, -0.3, 2.0], [0.0, 0.0, 0.0], [1.0, 6.0, -2.0], [3.0, -4.0, 0.2]], np.float32)


def _blocks(x):
    return [x[:, 3 * k:3 * k + 3] for k in range(len(GRADIENT_FNS))]


def _all_fns(params, x):
    return jnp.concatenate([f(b) for f, b in zip(GRADIENT_FNS.values(), _blocks(x))], axis=1)


def test_gradients_match_jax_at_kinks_and_through_custom_jvp():
    example = np.tile(KINKS, (1, len(GRADIENT_FNS)))
    module = to_torchscript(_all_fns, {}, (example,), dynamic_axes=[{0: "batch"}])
    x = np.concatenate([example, rng.standard_normal((4, example.shape[1])).astype(np.float32)])
    value_jax = np.asarray(_all_fns({}, x))
    weights = np.cos(np.arange(value_jax.size, dtype=np.float32)).reshape(value_jax.shape)

    grad_jax = np.asarray(jax.jit(jax.grad(lambda z: jnp.sum(_all_fns({}, z) * weights)))(x))
    xt = torch.from_numpy(x).requires_grad_(True)
    out = module(xt)
    (out * torch.from_numpy(weights)).sum().backward()
    grad_torch = xt.grad.numpy()

    with torch.no_grad():  # the primal (no-grad) path of custom_jvp calls gives the same values
        assert np.allclose(module(torch.from_numpy(x)).numpy(), value_jax, rtol=RTOL, atol=1e-6)
    assert np.allclose(out.detach().numpy(), value_jax, rtol=RTOL, atol=1e-6)
    bad = [name for name, gj, gt in zip(GRADIENT_FNS, _blocks(grad_jax), _blocks(grad_torch))
           if not np.allclose(gj, gt, rtol=RTOL, atol=1e-6)]
    assert not bad, bad


def test_custom_vjp_exports_its_primal_with_a_warning():
    with pytest.warns(UserWarning, match="custom_vjp function 'clip_gradient'"):
        module = to_torchscript(lambda p, x: clip_gradient(x) * 3.0, {}, (KINKS,))
    assert torch.equal(module(torch.from_numpy(KINKS)), torch.from_numpy(KINKS) * 3.0)


OP_GROUPS = {
    "indexing": lambda p, x, idx, i: (
        x[idx], x[:, idx[:1]], jnp.take_along_axis(x, jnp.argsort(x, axis=1), axis=1),
        jax.ops.segment_sum(x, idx, num_segments=4), x.at[idx, 0].set(1.0), x.at[:, 1].add(2.0),
        x.at[idx].max(0.5), x.at[idx].mul(2.0), jax.lax.dynamic_slice(x, (i, 0), (1, 3)),
        jax.lax.dynamic_update_slice(x, jnp.ones((1, 2)), (i, 1)), x[i], x[-1], jnp.take(p, idx, axis=0, mode="clip"),
        jnp.take(p, idx + 3, axis=0, mode="fill", fill_value=-1.0), x[:, ::-1]),
    "control_flow": lambda p, x, idx, i: (
        jax.lax.cond(i > 0, lambda z: z * 2, lambda z: z - 1, x),
        jax.lax.switch(i, [lambda z: z * 2, lambda z: z - 1, jnp.sin], x),
        jax.lax.fori_loop(0, 3, lambda k, z: z * 1.5 + k, x),
        jax.lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, c[1] * 1.1), (i, x))[1],
        *jax.lax.scan(lambda c, z: (c + z, c * z), jnp.zeros(3), x),
        *jax.lax.scan(lambda c, z: (c + z, c * z), jnp.zeros(3), x, reverse=True),
        jax.checkpoint(jnp.sin)(x), jax.jit(lambda z: z @ p.T)(x)),
    "reductions": lambda p, x, idx, i: (
        x.sum(0), x.max(1), x.min(), x.prod(1), jnp.all(x > 0, 1), jnp.any(x > 0), jnp.sum(idx), jnp.mean(x),
        jnp.var(x, 0), jnp.argmax(x, 1), jnp.argmin(x, 0), jnp.sort(x, axis=0), jnp.argsort(x, axis=1),
        *jax.lax.top_k(x, 2), jnp.cumsum(x, axis=0), jax.lax.cumsum(x, 0, reverse=True), jax.lax.cummax(x, 1),
        jax.lax.cumlogsumexp(x, 0), jnp.cumprod(x, 1), jnp.cumsum(idx)),
    "elementwise": lambda p, x, idx, i: (
        jnp.exp(x), jnp.log1p(jnp.abs(x)), jnp.sqrt(jnp.abs(x)), jax.lax.rsqrt(jnp.abs(x) + 1), x ** 3,
        jnp.power(jnp.abs(x), 1.3), jnp.sign(x), jnp.round(x * 3), jnp.floor(x), jnp.ceil(x), jnp.fmod(x, 0.3),
        jnp.remainder(x, 0.3), jax.scipy.special.erfinv(jnp.tanh(x) * 0.9), jnp.arctan2(x, x + 1),
        jnp.minimum(x, idx[:, None] * 1.0), jnp.where(x > 0, x, 0.0), jnp.cbrt(x), jnp.expm1(x), jnp.tan(x),
        jax.scipy.special.erfc(x), jnp.arcsinh(x), jax.lax.integer_pow(x + 3, -2), jnp.isfinite(x / (x - x)),
        jnp.exp2(x), jax.lax.square(x), jax.nn.sigmoid(x), jax.lax.round(x), jax.nn.one_hot(idx, 4),
        jax.lax.reduce_precision(x, 8, 7), x.astype(jnp.bfloat16).astype(jnp.float32), x.astype(jnp.int32),
        jnp.clip(x, x[:1], 0.5), 2.0 / (x + 9.0), 1.0 - x, jnp.maximum(0.5, x), 0.0 < x, jnp.heaviside(x, 0.5)),
    "integers": lambda p, x, idx, i: (
        idx // 2, idx % 3, -idx, idx * i, jnp.abs(idx - 2), idx >> 1, idx << 2, ~idx, idx & 3, idx | 1,
        (idx > 1) & (idx < 3), ~(idx > 1), jnp.sign(idx - 1), jnp.maximum(idx, 2), idx.astype(jnp.float32) / 2,
        jnp.where(idx > 1, idx, -idx), (idx - 3) // 2, (idx - 3) % 2),
    "shapes": lambda p, x, idx, i: (
        x.T, x.reshape(-1, 1), jnp.expand_dims(x, 1), jnp.concatenate([x, x], 1), *jnp.split(x, 3, axis=1),
        x[1:, ::2], jnp.squeeze(x[:, :1], 1), jnp.broadcast_to(x[:, None, :], (x.shape[0], 2, 3)), jnp.stack([x, x]),
        jnp.einsum("bi,bj->bij", x, x), jnp.einsum("bi,ji->bj", x, p), x @ p.T @ p, jnp.einsum("bi,bi->b", x, x),
        jnp.einsum("ij,bj->ib", p, x), jnp.einsum("bij,bjk->bik", x[:, :, None], x[:, None, :]),
        jnp.arange(x.shape[0])[:, None] * jnp.arange(3)[None, :], jnp.pad(x, ((1, 2), (0, 1))),
        jax.lax.pad(x, 0.0, ((1, -1, 1), (0, 0, 0))), jnp.pad(x, 1, constant_values=-3.0), jnp.tile(x, (2, 1)),
        jnp.repeat(x, 2, axis=1), jnp.flip(x, 0), jnp.tril(jnp.ones((x.shape[0], x.shape[0]))), jnp.roll(x, 1, 1)),
}


@pytest.mark.parametrize("group", sorted(OP_GROUPS))
def test_op_groups_match_jax_on_other_sizes(group):
    fn = OP_GROUPS[group]
    p = rng.standard_normal((2, 3)).astype(np.float32)

    def example(batch, i):
        return (rng.standard_normal((batch, 3)).astype(np.float32), rng.integers(0, 4, batch).astype(np.int32),
                np.array(i, np.int32))

    module = to_torchscript(fn, p, example(5, 1), dynamic_axes=[{0: "batch"}, {0: "batch"}, None])
    for batch, i in ((7, 1), (3, 0), (9, 2)):
        assert parity(fn, p, module, example(batch, i))["max_rel"] <= RTOL, (batch, i)


class Convs(nn.Module):
    @nn.compact
    def __call__(self, x):  # (batch, 9, 9, 2) NHWC
        a = nn.Conv(3, (3, 3), strides=(2, 2), padding=((1, 2), (0, 1)), kernel_dilation=(1, 2))(x)
        b = nn.Conv(4, (2, 2), feature_group_count=2, padding="SAME")(x)
        c = nn.ConvTranspose(2, (3, 3), strides=(2, 2))(x)
        d = nn.Conv(2, (3,))(x[:, 0])  # 1-d
        e = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        f = nn.avg_pool(x, (2, 2), strides=(1, 1), padding=((1, 0), (0, 1)), count_include_pad=False)
        g = jax.lax.reduce_window(x, jnp.inf, jax.lax.min, (1, 2, 3, 1), (1, 1, 2, 1), "VALID")
        return a, b, c, d, e, f, g


def test_convolutions_and_pooling_match_jax():
    model = Convs()
    x = rng.standard_normal((2, 9, 9, 2)).astype(np.float32)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                          jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
    module = to_torchscript(model.apply, params, (x,), dynamic_axes=[{0: "batch"}])
    assert parity(model.apply, params, module, (rng.standard_normal((3, 9, 9, 2)).astype(np.float32),))[
        "max_rel"] <= RTOL


class FusedBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8)(nn.LayerNorm()(x))
        return jax.nn.softmax(nn.gelu(h)), jax.nn.log_softmax(nn.silu(h)), nn.gelu(h, approximate=False)


def test_jax_nn_chains_become_native_torch_ops_with_the_same_values_and_gradients():
    model = FusedBlock()
    x = rng.standard_normal((3, 6)).astype(np.float32) * 3 + 1
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                          jax.eval_shape(model.init, jax.random.PRNGKey(0), x))
    module = to_torchscript(model.apply, params, (x,), dynamic_axes=[{0: "batch"}])
    code = module.code
    for native in ("layer_norm", "linear", "sigmoid", "softmax", "log_softmax", "silu", "gelu"):
        assert native in code, native
    assert "tanh" not in code and "rsqrt" not in code  # the gelu and LayerNorm chains are gone

    x = rng.standard_normal((5, 6)).astype(np.float32) * 3 + 1
    assert parity(model.apply, params, module, (x,))["max_rel"] <= RTOL
    weights = [np.cos(np.arange(5 * 8, dtype=np.float32) + k).reshape(5, 8) for k in range(3)]

    def loss(z):
        return sum(jnp.sum(o * w) for o, w in zip(model.apply(params, z), weights))

    xt = torch.from_numpy(x).requires_grad_(True)
    sum((o * torch.from_numpy(w)).sum() for o, w in zip(module(xt), weights)).backward()
    grad_jax = np.asarray(jax.jit(jax.grad(loss))(x))
    assert np.abs(xt.grad.numpy() - grad_jax).max() <= RTOL * np.abs(grad_jax).max()
