"""e3nn-jax: a small E(3)-equivariant energy model (spherical harmonics of edge vectors, tensor products, Gate,
flax Linear layers) exported with forces, and a tensor-product/Gate feature map on its own."""

from __future__ import annotations

import e3nn_jax as e3nn
import flax.linen as nn
import jax
import jax.numpy as jnp

from . import Case, cast, case, np_dtype, rng

CUTOFF = 2.5


class EquivariantEnergy(nn.Module):
    """Dense all-pairs messages: sh(r_ij) * radial(|r_ij|) summed over j, a Gate, a tensor square to scalars."""

    @nn.compact
    def __call__(self, r):
        vec = r[:, None, :] - r[None, :, :]
        d2 = jnp.sum(vec * vec, axis=-1)
        mask = (d2 > 0.0) & (d2 < CUTOFF ** 2)
        d = jnp.sqrt(jnp.where(mask, d2, 1.0))
        sh = e3nn.spherical_harmonics("0e + 1o + 2e", jnp.where(mask[..., None], vec, 1.0), normalize=True)
        radial = e3nn.soft_one_hot_linspace(d, start=0.0, end=CUTOFF, number=6, basis="smooth_finite",
                                            cutoff=True)
        weights = nn.Dense(3)(radial) * mask[..., None]                   # one weight per l
        msg = e3nn.IrrepsArray(sh.irreps, jnp.concatenate(
            [weights[..., 0:1] * sh.array[..., 0:1], weights[..., 1:2] * sh.array[..., 1:4],
             weights[..., 2:3] * sh.array[..., 4:9]], axis=-1))
        node = e3nn.sum(msg, axis=1)                                        # (atoms, 0e + 1o + 2e)
        node = e3nn.flax.Linear("8x0e + 4x1o + 4x2e")(node)
        node = e3nn.gate(node)                                              # 4 gates consumed: 4x0e + 4x1o + 4x2e
        sq = e3nn.tensor_product(node, node, filter_ir_out=["0e"])
        node = e3nn.flax.Linear("1x0e")(e3nn.concatenate([node.filter(keep="0e"), sq]).regroup())
        return jnp.sum(node.array)


@case("e3nn_equivariant_energy")
def equivariant_energy(dtype):
    model = EquivariantEnergy()
    r1 = 1.2 * rng(1).standard_normal((5, 3))
    params = cast(model.init(jax.random.PRNGKey(0), jnp.asarray(r1, jnp.float32)), dtype)

    def fn(p, r):
        return model.apply(p, r)
    return Case("", fn, params, (r1.astype(np_dtype(dtype)),),
                ((1.4 * rng(2).standard_normal((9, 3))).astype(np_dtype(dtype)),), [{0: "atoms"}],
                with_forces=True)


@case("e3nn_tensor_product_gate")
def tensor_product_gate(dtype):
    """Per-atom features: sh(x) (x) sh(x) -> Linear -> Gate -> norms, batch dynamic."""
    class Features(nn.Module):
        @nn.compact
        def __call__(self, x):
            sh = e3nn.spherical_harmonics("1o + 2e", x, normalize=False)
            tp = e3nn.tensor_product(sh, sh, filter_ir_out=["0e", "1o", "2e"])
            h = e3nn.gate(e3nn.flax.Linear("6x0e + 2x1o + 2x2e")(tp))
            return e3nn.norm(h).array
    model = Features()
    x1 = rng(3).standard_normal((4, 3))
    params = cast(model.init(jax.random.PRNGKey(1), jnp.asarray(x1, jnp.float32)), dtype)

    def fn(p, x):
        return model.apply(p, x)
    return Case("", fn, params, (x1.astype(np_dtype(dtype)),),
                (rng(4).standard_normal((7, 3)).astype(np_dtype(dtype)),), [{0: "batch"}])
