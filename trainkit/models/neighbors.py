"""A SchNet-like interatomic potential on neighbor lists: linear in atoms, exact for any cutoff and cell.

The same network as `trainkit.models.potential` (species embedding, Gaussian radial basis, cosine cutoff,
per-species reference energies over every element, `energy_scale`; same parameter names and shapes), but the
sums over neighbors run over the edges of a neighbor list with `jax.ops.segment_sum` instead of over all N²
minimum-image pairs. One structure, no batch axis, so exports have dynamic "atoms" and "edges" dims:

    atomic_energies(params, numbers (N,), edge_i (E,), edge_j (E,), vectors (E, 3)) -> (N,) eV
    predict(params, positions (N, 3), numbers (N,), cell (3, 3), edge_i, edge_j, shifts (E, 3) int32)
        -> energy (), forces (N, 3) eV/Å, stress (3, 3) eV/Å³, energies (N,) eV

vectors[e] = positions[edge_j[e]] - positions[edge_i[e]] + shifts[e] @ cell (rows of `cell` are lattice
vectors), a full list (both directions). Padding: atoms with number 0 and zero-length edges (i = j, zero shift)
add nothing, with finite gradients. Forces are -dE/dpositions; stress is (1/V) dE/dε at ε = 0 for the symmetric
strain positions @ (1 + ε), cell @ (1 + ε): ASE's convention (`atoms.get_stress(voigt=False)`: negative under
compression). A zero cell (non-periodic) gives zero stress.
Training batches are B structures padded to fixed (atoms, edges) buckets (`trainkit.data.neighbors`); loss and
evaluate `jax.vmap` the single-structure functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trainkit.data.neighbors import neighbor_list, pad_edges
from trainkit.errors import TrainkitError
from trainkit.models import InputSpec, Task
from trainkit.models.potential import MAX_Z, radial_basis, reference_table

VOLUME_PER_ATOM = 11.8  # Å³, fcc Cu: the density of `example_inputs`' random cells


class NeighborPotential(nn.Module):
    """(numbers, edge_i, edge_j, vectors) -> per-atom energies (N,) in eV."""

    cutoff: float
    energy_ref: tuple[float, ...]  # per atomic number 0..MAX_Z, eV/atom (initial value of a parameter)
    energy_scale: float = 1.0  # eV per unit of network output
    features: int = 32
    num_rbf: int = 16
    rounds: int = 2

    @nn.compact
    def __call__(self, numbers: jax.Array, edge_i: jax.Array, edge_j: jax.Array, vectors: jax.Array) -> jax.Array:
        n = numbers.shape[0]
        atom = numbers > 0
        d2 = jnp.sum(vectors * vectors, axis=-1)
        edge = (d2 > 0) & (d2 < self.cutoff**2) & atom[edge_i] & atom[edge_j]
        fc, rbf = radial_basis(d2, edge, self.cutoff, self.num_rbf)  # (E,), (E, K)

        h = nn.Embed(MAX_Z + 1, self.features, name="species")(numbers)
        for t in range(self.rounds):
            filt = nn.Dense(self.features, use_bias=False, name=f"filter_{t}")(rbf) * fc[:, None]
            neighbor = nn.Dense(self.features, use_bias=False, name=f"neighbor_{t}")(h)
            messages = jax.ops.segment_sum(filt * neighbor[edge_j], edge_i, num_segments=n)
            h = h + nn.Dense(self.features, name=f"update_{t}_out")(
                nn.silu(nn.Dense(self.features, name=f"update_{t}_in")(messages))
            )
        out = nn.Dense(1, name="energy_out")(nn.silu(nn.Dense(self.features, name="energy_in")(h)))[:, 0]
        ref = self.param("energy_ref", lambda _: jnp.asarray(self.energy_ref, jnp.float32))
        per_atom = self.energy_scale * out + jnp.take(jnp.asarray(ref), numbers, axis=0)
        return jnp.where(atom, per_atom, 0.0)


def cell_volume(cell: jax.Array) -> jax.Array:
    """|det(cell)| by a triple product (plain ops, exportable)."""
    return jnp.abs(jnp.sum(cell[0] * jnp.cross(cell[1], cell[2])))


def energy_forces_stress(atomic_energies, params: Any, positions: jax.Array, numbers: jax.Array, cell: jax.Array,
                         edge_i: jax.Array, edge_j: jax.Array, shifts: jax.Array):
    """(energy, forces, stress, energies) of one structure from `atomic_energies(params, numbers, edge_i, edge_j,
    vectors)`: forces = -dE/dpositions, stress = (1/V) dE/dε (ASE's sign), zero for a zero cell."""

    def total(positions, cell, strain):
        deform = jnp.eye(3, dtype=cell.dtype) + 0.5 * (strain + strain.T)
        positions, cell = positions @ deform, cell @ deform
        vectors = positions[edge_j] - positions[edge_i] + shifts.astype(cell.dtype) @ cell
        energies = atomic_energies(params, numbers, edge_i, edge_j, vectors)
        return jnp.sum(energies), energies

    strain = jnp.zeros((3, 3), cell.dtype)
    (grad_positions, grad_strain), energies = jax.grad(total, argnums=(0, 2), has_aux=True)(positions, cell, strain)
    volume = cell_volume(cell)
    periodic = volume > 0
    stress = jnp.where(periodic, grad_strain / jnp.where(periodic, volume, 1.0), 0.0)
    return jnp.sum(energies), -grad_positions, stress, energies


def build(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> Task:
    """config.model keys: features, num_rbf, rounds, energy_weight, force_weight, stress_weight (default 1; used
    when the data has stress). Cutoff, reference energies and scales come from the dataset's `info`."""
    if "num_edges" not in info:
        raise TrainkitError("model 'neighbor_potential' trains on neighbor-list batches; set "
                            "--config.data.name=neighbors (the dense 'potential' model takes 'molecules')")
    module = NeighborPotential(
        cutoff=float(info["cutoff"]),
        energy_ref=reference_table(info["species"], info["energy_ref"]),
        energy_scale=float(info["force_rms"]),  # per-atom energies vary on the scale of force x 1 Å
        features=int(config.features),
        num_rbf=int(config.num_rbf),
        rounds=int(config.rounds),
    )
    weights = {k: float(config.get(f"{k}_weight", 1.0)) for k in ("energy", "force", "stress")}
    return neighbor_task(module, info, **weights)


def neighbor_task(module: NeighborPotential, info: Mapping[str, Any], energy: float = 1.0, force: float = 1.0,
                  stress: float = 1.0) -> Task:
    """A Task on padded batches {positions, numbers, cell, edge_i, edge_j, shifts, energy, forces[, stress]}.
    Per structure, the loss is (each term dimensionless)
        energy * (energy error per atom / energy_scale)²
        + force * mean over components of (force error / force_rms)²
        + stress * mean over components of (stress error / stress_rms)²   (when the batch has stress),
    metrics `energy_mae` (eV/atom), `force_mae` (eV/Å, over components), `stress_mae` (eV/Å³)."""
    energy_scale, force_scale = float(info["energy_scale"]), float(info["force_rms"])
    stress_scale = float(info.get("stress_rms", 1.0))
    species = np.asarray(info["species"], np.int32)
    cutoff = float(module.cutoff)

    def init(rng: jax.Array):
        numbers, pair = jnp.full((2,), int(species[0]), jnp.int32), jnp.array([0, 1], jnp.int32)
        return module.init(rng, numbers, pair, pair[::-1], jnp.array([[1.0, 0, 0], [-1.0, 0, 0]]))["params"]

    def atomic_energies(params, numbers, edge_i, edge_j, vectors):
        return module.apply({"params": params}, numbers, edge_i, edge_j, vectors)

    def predict(params, positions, numbers, cell, edge_i, edge_j, shifts):
        return energy_forces_stress(atomic_energies, params, positions, numbers, cell, edge_i, edge_j, shifts)

    def structure_metrics(params, s):
        e, forces, sigma, _ = predict(params, s["positions"], s["numbers"], s["cell"], s["edge_i"], s["edge_j"],
                                      s["shifts"])
        atom = (s["numbers"] > 0).astype(forces.dtype)
        n_atoms = jnp.maximum(atom.sum(), 1.0)
        e_err = (e - s["energy"]) / n_atoms  # eV/atom
        f_err = (forces - s["forces"]) * atom[:, None]  # eV/Å
        loss = energy * (e_err / energy_scale) ** 2 + force * jnp.sum(f_err**2) / (3 * n_atoms) / force_scale**2
        metrics = {"energy_mae": jnp.abs(e_err), "force_mae": jnp.sum(jnp.abs(f_err)) / (3 * n_atoms)}
        if "stress" in s:
            s_err = sigma - s["stress"]  # eV/Å³
            loss = loss + stress * jnp.mean(s_err**2) / stress_scale**2
            metrics["stress_mae"] = jnp.mean(jnp.abs(s_err))
        return {"loss": loss, **metrics}

    evaluate = jax.vmap(structure_metrics, in_axes=(None, 0))

    def loss(params, batch, rng):
        del rng  # deterministic model
        metrics = {k: v.mean() for k, v in evaluate(params, batch).items()}
        return metrics["loss"], metrics

    def example_inputs(seed: int, dims: Mapping[str, int]):
        """A random periodic cell of dims["atoms"] atoms (a jittered grid at fcc Cu's density, sheared) and its
        full neighbor list at the cutoff; dims["edges"], if given, is a minimum: the list is padded up to it."""
        rng = np.random.default_rng(seed)
        n = int(dims.get("atoms", 8))
        k = int(np.ceil(n ** (1 / 3) - 1e-9))
        grid = np.stack(np.meshgrid(*[np.arange(k)] * 3, indexing="ij"), -1).reshape(-1, 3)
        frac = (grid[rng.choice(len(grid), n, replace=False)] + rng.normal(0, 0.1, (n, 3))) / k
        shear = rng.uniform(-0.05, 0.05, (3, 3))
        cell = ((VOLUME_PER_ATOM * n) ** (1 / 3) * (np.eye(3) + (shear + shear.T) / 2)).astype(np.float32)
        positions = (frac @ cell).astype(np.float32)
        numbers = rng.choice(species, n).astype(np.int32)
        edges = neighbor_list(positions, cell, cutoff)
        edge_i, edge_j, shifts = pad_edges(*edges, max(len(edges[0]), int(dims.get("edges", 0))))
        return positions, numbers, cell, edge_i, edge_j, shifts

    return Task(
        name="neighbor_potential",
        init=init,
        loss=loss,
        evaluate=evaluate,
        predict=predict,
        inputs=(
            InputSpec("positions", ("atoms", 3), "float32"),
            InputSpec("numbers", ("atoms",), "int32"),
            InputSpec("cell", (3, 3), "float32"),
            InputSpec("edge_i", ("edges",), "int32"),
            InputSpec("edge_j", ("edges",), "int32"),
            InputSpec("shifts", ("edges", 3), "int32"),
        ),
        outputs=("energy", "forces", "stress", "energies"),
        example_inputs=example_inputs,
        has_forces=False,  # forces are an output of predict
        atomic_energies=atomic_energies,
        cutoff=cutoff,
    )
