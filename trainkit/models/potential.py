"""A machine-learned interatomic potential (SchNet-like) and its energy + force Task.

predict(params, positions (B, N, 3), numbers (B, N), cell (B, 3, 3)) -> energy (B,) in eV, where
forces = -dE/dpositions (eV/Å) come from `jax.grad`. Periodic cells use the minimum-image convention on all
N² pairs, which is exact while the cutoff is below half the cell's perpendicular width (the data generator
checks this). Atoms with atomic number 0 are padding: they neither feel nor exert anything.

Per atom i: h_i = embedding(Z_i); `rounds` continuous-filter convolutions
    h_i += MLP( sum_j (F rbf(r_ij)) * fc(r_ij) * (W h_j) )
with Gaussian radial basis functions rbf, a learned linear filter F and a smooth cosine cutoff fc; then
    E = sum_i [ energy_scale * MLP(h_i) + energy_ref[Z_i] ],
where energy_ref starts from per-species energies fitted on the training set. Everything is plain jnp
(dense, no segment_sum, no linalg calls) so `jax.export` and the TorchScript converter take it as is, with
symbolic "batch" and "atoms" dimensions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trainkit.models import InputSpec, Task

MAX_Z = 118  # the species tables cover every element, so checkpoints do not depend on the dataset's species


def inverse_cell(cell: jax.Array) -> jax.Array:
    """Inverse of (..., 3, 3) matrices by cofactors (plain ops, exportable): frac = r @ inverse_cell(cell)."""
    a0, a1, a2 = cell[..., 0, :], cell[..., 1, :], cell[..., 2, :]
    cofactors = jnp.stack([jnp.cross(a1, a2), jnp.cross(a2, a0), jnp.cross(a0, a1)], axis=-1)
    det = jnp.sum(a0 * jnp.cross(a1, a2), axis=-1)
    return cofactors / det[..., None, None]


def pair_vectors(positions: jax.Array, cell: jax.Array) -> jax.Array:
    """Minimum-image vectors r_j - r_i, shape (B, N, N, 3)."""
    d = positions[:, None, :, :] - positions[:, :, None, :]
    frac = jnp.einsum("bijk,bkl->bijl", d, inverse_cell(cell))
    frac = frac - jnp.round(frac)  # round's derivative is zero: the image shift is a constant
    return jnp.einsum("bijk,bkl->bijl", frac, cell)


def radial_basis(d2: jax.Array, pair: jax.Array, cutoff: float, num_rbf: int) -> tuple[jax.Array, jax.Array]:
    """(smooth cosine cutoff fc, Gaussian radial basis (..., num_rbf)) of squared distances `d2` where `pair`;
    masked before the sqrt, so masked-off pairs (r = 0 included) get no NaN gradient. Both potentials use it."""
    r = jnp.sqrt(jnp.where(pair, d2, 1.0))
    fc = jnp.where(pair, 0.5 * (jnp.cos(jnp.pi * r / cutoff) + 1.0), 0.0)
    centers = jnp.linspace(0.0, cutoff, num_rbf)
    width = cutoff / (num_rbf - 1)
    return fc, jnp.exp(-(((r[..., None] - centers) / width) ** 2))


class Potential(nn.Module):
    """(positions, numbers, cell) -> total energy (B,) in eV."""

    cutoff: float
    energy_ref: tuple[float, ...]  # per atomic number 0..MAX_Z, eV/atom (initial value of a parameter)
    energy_scale: float = 1.0  # eV per unit of network output
    features: int = 32
    num_rbf: int = 16
    rounds: int = 2

    @nn.compact
    def __call__(self, positions: jax.Array, numbers: jax.Array, cell: jax.Array) -> jax.Array:
        n = numbers.shape[1]
        atom = numbers > 0
        d = pair_vectors(positions, cell)
        d2 = jnp.sum(d * d, axis=-1)
        not_self = jnp.arange(n)[:, None] != jnp.arange(n)[None, :]
        pair = atom[:, :, None] & atom[:, None, :] & not_self & (d2 < self.cutoff**2)
        fc, rbf = radial_basis(d2, pair, self.cutoff, self.num_rbf)  # (B, N, N), (B, N, N, K)

        h = nn.Embed(MAX_Z + 1, self.features, name="species")(numbers)
        for t in range(self.rounds):
            # A linear filter: the Gaussians already make any smooth radial function (cheap on N² pairs).
            filt = nn.Dense(self.features, use_bias=False, name=f"filter_{t}")(rbf) * fc[..., None]
            messages = jnp.einsum("bijf,bjf->bif", filt, nn.Dense(self.features, use_bias=False,
                                                                  name=f"neighbor_{t}")(h))
            h = h + nn.Dense(self.features, name=f"update_{t}_out")(
                nn.silu(nn.Dense(self.features, name=f"update_{t}_in")(messages))
            )
        out = nn.Dense(1, name="energy_out")(nn.silu(nn.Dense(self.features, name="energy_in")(h)))[..., 0]
        ref = self.param("energy_ref", lambda _: jnp.asarray(self.energy_ref, jnp.float32))
        per_atom = self.energy_scale * out + jnp.take(jnp.asarray(ref), numbers, axis=0)
        return jnp.sum(jnp.where(atom, per_atom, 0.0), axis=-1)


def reference_table(species: Sequence[int], energies: Sequence[float]) -> tuple[float, ...]:
    """Per-species energies spread into a table over atomic numbers 0..MAX_Z (0 elsewhere)."""
    table = np.zeros(MAX_Z + 1)
    table[np.asarray(species, dtype=np.int64)] = energies
    return tuple(float(e) for e in table)


def energy_and_forces(
    predict: Callable[..., jax.Array], params: Any, positions: jax.Array, numbers: jax.Array, cell: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Energies (B,) and forces -dE/dpositions (B, N, 3) of `predict` (a Task's predict)."""

    def total(p):
        energy = predict(params, p, numbers, cell)
        return energy.sum(), energy  # structures are independent: d(sum)/d(positions of b) = dE_b/dpositions

    grad, energy = jax.grad(total, has_aux=True)(positions)
    return energy, -grad


def build(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> Task:
    """config.model keys: features, num_rbf, rounds, energy_weight, force_weight. The cutoff, reference
    energies and scales come from the dataset's `info`."""
    module = Potential(
        cutoff=float(info["cutoff"]),
        energy_ref=reference_table(info["species"], info["energy_ref"]),
        energy_scale=float(info["force_rms"]),  # per-atom energies vary on the scale of force x 1 Å
        features=int(config.features),
        num_rbf=int(config.num_rbf),
        rounds=int(config.rounds),
    )
    return potential_task(module, info, float(config.energy_weight), float(config.force_weight))


def potential_task(
    module: Potential, info: Mapping[str, Any], energy_weight: float, force_weight: float
) -> Task:
    """A Task on batches {positions, numbers, cell, energy, forces}. Per structure, the loss is
        energy_weight * (energy error per atom / energy_scale)²
        + force_weight * mean over components of (force error / force_rms)²,
    both terms dimensionless; metrics are `energy_mae` (eV/atom) and `force_mae` (eV/Å, over components)."""
    energy_scale = float(info["energy_scale"])
    force_scale = float(info["force_rms"])
    species = np.asarray(info["species"], np.int32)

    def init(rng: jax.Array):
        shapes = (jnp.zeros((1, 2, 3)), jnp.full((1, 2), int(species[0]), jnp.int32), 10 * jnp.eye(3)[None])
        return module.init(rng, *shapes)["params"]

    def predict(params, positions, numbers, cell):
        return module.apply({"params": params}, positions, numbers, cell)

    def per_structure(params, batch):
        positions, numbers, cell = batch["positions"], batch["numbers"], batch["cell"]
        energy, forces = energy_and_forces(predict, params, positions, numbers, cell)
        atom = (batch["numbers"] > 0).astype(jnp.float32)
        n_atoms = jnp.maximum(atom.sum(-1), 1.0)
        e_err = (energy - batch["energy"]) / n_atoms  # eV/atom
        f_err = (forces - batch["forces"]) * atom[..., None]  # eV/Å
        f_mse = jnp.sum(f_err**2, axis=(-1, -2)) / (3 * n_atoms)
        loss = energy_weight * (e_err / energy_scale) ** 2 + force_weight * f_mse / force_scale**2
        return {
            "loss": loss,
            "energy_mae": jnp.abs(e_err),
            "force_mae": jnp.sum(jnp.abs(f_err), axis=(-1, -2)) / (3 * n_atoms),
        }

    def loss(params, batch, rng):
        del rng  # deterministic model
        metrics = {k: v.mean() for k, v in per_structure(params, batch).items()}
        return metrics["loss"], metrics

    def example_inputs(seed: int, dims: Mapping[str, int]):
        rng = np.random.default_rng(seed)
        b, n = dims.get("batch", 2), dims.get("atoms", 4)
        side = max(2.5 * module.cutoff, (12.0 * n) ** (1 / 3))  # wide enough for minimum image
        cell = np.broadcast_to(side * np.eye(3), (b, 3, 3)).astype(np.float32)
        positions = rng.uniform(0, side, (b, n, 3)).astype(np.float32)
        numbers = rng.choice(species, (b, n)).astype(np.int32)
        return positions, numbers, cell

    return Task(
        name="potential",
        init=init,
        loss=loss,
        evaluate=per_structure,
        predict=predict,
        inputs=(
            InputSpec("positions", ("batch", "atoms", 3), "float32"),
            InputSpec("numbers", ("batch", "atoms"), "int32"),
            InputSpec("cell", ("batch", 3, 3), "float32"),
        ),
        outputs=("energy",),
        example_inputs=example_inputs,
        has_forces=True,
    )
