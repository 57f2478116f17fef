"""Layer-level fusions of the TorchScript exporter: pooling windows, conv + bias + relu and dot-product
attention become single native torch kernels, and activations and residual adds after a Dense run in place on
its output (asserted on the scripted code), with the same values as JAX on other sizes than the traced ones
and, where the fusion runs in place, the same gradients."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from trainkit.export.torchscript import parity, to_torchscript
from trainkit.export.torchscript.fusion.dense import GELU_CHUNK
from trainkit.models.transformer import CausalSelfAttention, DecoderLM, lm_task

RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
rng = np.random.default_rng(0)


def _export(model, example, axes, **kw):
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype) * 0.5,
                          jax.eval_shape(model.init, jax.random.PRNGKey(0), *example))
    module = to_torchscript(model.apply, params, example, dynamic_axes=axes, **kw)
    return params, module, module.code


class Pools(nn.Module):
    @nn.compact
    def __call__(self, x):  # NHWC
        h = nn.relu(nn.Conv(4, (3, 3))(x))
        return (nn.avg_pool(h, (2, 2), strides=(2, 2)),
                nn.avg_pool(x, (3, 2), strides=(1, 2), padding="SAME"),  # zero padding counted, as flax does
                nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (0, 2))),
                jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, 2, 2), (1, 1, 1, 1), "VALID"))  # NCHW window


def test_pooling_windows_become_native_pooling():
    x = rng.standard_normal((2, 9, 8, 3)).astype(np.float32)
    params, module, code = _export(Pools(), (x,), [{0: "batch"}])
    assert code.count("avg_pool2d") == 3 and code.count("max_pool2d") == 1, code
    assert "unfold" not in code
    other = rng.standard_normal((5, 9, 8, 3)).astype(np.float32)
    assert parity(Pools().apply, params, module, (other,))["max_rel"] <= RTOL


class ConvRelu(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.relu(nn.Conv(3, (3, 3), use_bias=False, strides=(2, 2))(x))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_conv_bias_and_relu_run_in_the_conv_kernel_with_jax_gradients():
    model = ConvRelu()
    x = rng.standard_normal((2, 6, 6, 2)).astype(np.float32)
    params, module, code = _export(model, (x,), [{0: "batch"}])
    assert code.count("relu_(") == 2 and "conv2d(" in code and "torch.add(" not in code, code
    other = rng.standard_normal((4, 6, 6, 2)).astype(np.float32)
    assert parity(model.apply, params, module, (other,))["max_rel"] <= RTOL
    forces = to_torchscript(model.apply, params, (x,), dynamic_axes=[{0: "batch"}], with_forces=True)
    assert parity(model.apply, params, forces, (other,), with_forces=True)["max_rel"] <= RTOL


class MaskedAttention(nn.Module):
    """flax's attention (the query scaled before the product) with a padding mask, or no mask."""

    @nn.compact
    def __call__(self, x, keep):
        mask = nn.make_attention_mask(keep, keep)
        attend = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, deterministic=True)
        return attend(x, mask=mask), attend(x)


def test_masked_and_unmasked_attention_become_scaled_dot_product_attention():
    model = MaskedAttention()
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    axes = [{0: "batch", 1: "seq"}, {0: "batch", 1: "seq"}]
    params, module, code = _export(model, (x, keep), axes)
    assert code.count("scaled_dot_product_attention") == 2 and "softmax" not in code, code
    assert "True, scale" not in code  # neither is causal
    other = rng.standard_normal((3, 7, 6)).astype(np.float32)
    keep = np.array([[1] * 7, [1, 1, 0, 0, 0, 0, 0], [0] * 7], np.int32)  # a row with every key masked
    assert parity(model.apply, params, module, (other, keep))["max_rel"] <= RTOL


def test_causal_attention_becomes_is_causal_on_other_batch_and_sequence_sizes():
    model = CausalSelfAttention(num_heads=4)

    def apply(params, x):
        return model.apply(params, x, False)

    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype) * 0.5,
                          jax.eval_shape(lambda k: model.init(k, x, False), jax.random.PRNGKey(0)))
    module = to_torchscript(apply, params, (x,), dynamic_axes=[{0: "batch", 1: "seq"}])
    assert "scaled_dot_product_attention" in module.code and "True, scale" in module.code, module.code
    assert "softmax" not in module.code and "arange" not in module.code
    for shape in ((3, 11, 16), (1, 1, 16)):
        other = rng.standard_normal(shape).astype(np.float32)
        assert parity(apply, params, module, (other,))["max_rel"] <= RTOL, shape
    xt = torch.from_numpy(other).requires_grad_(True)
    module(xt).sum().backward()
    grad = jax.grad(lambda z: jnp.sum(apply(params, z)))(other)
    assert np.abs(xt.grad.numpy() - np.asarray(grad)).max() <= RTOL * np.abs(np.asarray(grad)).max()


class DenseActivations(nn.Module):
    """Residual MLPs with each activation that runs in place on a Dense's output, then a Dense read twice."""

    @nn.compact
    def __call__(self, x):
        for act in (jax.nn.gelu, lambda h: jax.nn.gelu(h, approximate=False), nn.silu, nn.relu):
            x = x + nn.Dense(x.shape[-1])(act(nn.Dense(16)(x)))
        h = nn.Dense(x.shape[-1])(x)
        return jax.nn.gelu(h) + h  # h is read after the gelu: it must not be overwritten


def test_activations_and_residual_adds_run_in_place_on_dense_outputs_with_jax_values_and_gradients():
    model = DenseActivations()
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    params, module, code = _export(model, (x,), [{0: "batch"}])
    assert code.count("torch.split(") == 1 and code.count("torch.gelu_(") == 1, code  # tanh in chunks, erf
    assert code.count("torch.silu_(") == 1 and code.count("torch.relu_(") == 1, code
    assert code.count("torch.add_(") == 4 + 1, code  # the residuals and one in the tanh-gelu's loop
    assert code.count("torch.sigmoid(") == 2, code  # the tanh-gelu's grad branch and the twice-read gelu
    forces_module = to_torchscript(model.apply, params, (x,), dynamic_axes=[{0: "batch"}], with_forces=True)
    other = rng.standard_normal((GELU_CHUNK // 12 + 7, 3, 4)).astype(np.float32)  # two chunks of 16 features
    assert parity(model.apply, params, module, (other,))["max_rel"] <= RTOL
    # Forces are JAX's derivative, translated; no autograd, so the same on every call.
    for _ in range(3):
        assert parity(model.apply, params, forces_module, (other,), with_forces=True)["max_rel"] <= RTOL
    with torch.no_grad():
        in_place = module(torch.from_numpy(other))
    out_of_place = module(torch.from_numpy(other).requires_grad_(True))
    np.testing.assert_array_equal(in_place.numpy(), out_of_place.detach().numpy())


def test_transformer_mlp_gelu_and_residuals_run_in_place_and_keep_parameter_gradients():
    model = DecoderLM(vocab_size=11, max_len=16, d_model=16, num_heads=2, num_layers=2)
    task = lm_task(model)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype) * 0.5,
                          jax.eval_shape(task.init, jax.random.PRNGKey(0)))
    tokens = task.example_inputs(0, {"batch": 2, "seq": 5})
    module = to_torchscript(task.predict, params, tokens, dynamic_axes=[{0: "batch", 1: "seq"}])
    code = module.code
    assert code.count("torch.split(") == 2 and code.count("torch.add_(") == 2 * 3, code  # per layer: 2 residuals, gelu
    assert "torch.sigmoid(" in code  # only in the out-of-place branch for gradients
    other = task.example_inputs(1, {"batch": 3, "seq": 16})
    assert parity(task.predict, params, module, other)["max_rel"] <= RTOL
    # A loaded module fine-tuned in torch: a parameter that requires grad takes the out-of-place branch.
    kernel = module.p_Block_0_mlp_up_kernel.requires_grad_(True)
    grad = jax.grad(lambda p: jnp.sum(task.predict(p, *other)))(params)["Block_0"]["mlp"]["up"]["kernel"]
    for _ in range(3):  # from the 2nd call on, TorchScript's autodiff runs a compiled graph
        kernel.grad = None
        module(torch.from_numpy(other[0])).sum().backward()
        assert np.abs(kernel.grad.numpy() - np.asarray(grad)).max() <= RTOL * np.abs(np.asarray(grad)).max()
