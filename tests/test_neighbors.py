"""The neighbor-list potential (`trainkit.models.neighbors`) and its data (`trainkit.data.neighbors`).

Physics in float64 against independent references: the neighbor list against a brute-force search over
periodic images; energy, forces and stress against a dense all-pairs, all-images re-implementation of the
network written here from the parameters alone; stress against a finite-difference strain derivative, and
its sign convention against ASE's EMT. Cells include ones narrower than twice the cutoff (several images of
one neighbor) and a one-atom cell (an atom neighbors its own images). Then padding, the batched (vmap, padded)
loss against single-structure predict, linearity in atoms (shapes, not timings), export with symbolic
"atoms"/"edges" dims, and a tiny training run through the CLI.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from conftest import train
from configs import potential
from trainkit.data import load_dataset, molecules
from trainkit.data.neighbors import neighbor_list, pad_edges
from trainkit.errors import TrainkitError
from trainkit.logging.metrics import read_metrics
from trainkit.models import build_task
from trainkit.models.neighbors import NeighborPotential, neighbor_task
from trainkit.models.potential import reference_table

CUTOFF = 3.3
INFO = {"species": [28, 29], "energy_ref": [-0.3, 0.2], "cutoff": CUTOFF, "force_rms": 1.0, "energy_scale": 0.1,
        "stress_rms": 0.03, "num_edges": 0}


def make_task(rounds: int = 2):
    module = NeighborPotential(cutoff=CUTOFF, energy_ref=reference_table(INFO["species"], INFO["energy_ref"]),
                               energy_scale=1.0, features=8, num_rbf=8, rounds=rounds)
    return neighbor_task(module, INFO)


@pytest.fixture(scope="module")
def model():
    task = make_task()
    return task, jax.jit(task.init)(jax.random.key(0))


def structure(kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, numbers, cell) float64: rattled, sheared Cu/Ni fcc cells of three sizes."""
    from ase.build import bulk

    rng = np.random.default_rng(seed)
    atoms = {"primitive": bulk("Cu", "fcc", a=3.6),  # 1 atom, 2.1 Å wide: neighbors are its own images
             "small": bulk("Cu", "fcc", a=3.6, cubic=True),  # 4 atoms, 3.6 Å wide < 2 x cutoff
             "large": bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)}[kind]  # 32 atoms, wider than 2 x cutoff
    shear = rng.uniform(-0.04, 0.04, (3, 3))
    atoms.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + (shear + shear.T) / 2), scale_atoms=True)
    positions = atoms.positions + rng.normal(0, 0.1, atoms.positions.shape)
    numbers = rng.choice([28, 29], len(atoms)).astype(np.int32)
    return positions, numbers, np.asarray(atoms.cell, np.float64)


def image_range(cell: np.ndarray, cutoff: float) -> list[np.ndarray]:
    """Every integer shift whose image can hold a neighbor within `cutoff`, for any positions in the cell."""
    widths = molecules.perpendicular_widths(cell)
    reach = [int(np.ceil(cutoff / w)) + 1 for w in widths]
    return [np.array(s) for s in itertools.product(*[range(-m, m + 1) for m in reach])]


def brute_force_pairs(positions, cell, cutoff) -> set[tuple[int, int, tuple[int, ...]]]:
    found = set()
    for shift in image_range(cell, cutoff):
        d = positions[None, :, :] + shift @ cell - positions[:, None, :]
        for i, j in zip(*np.nonzero(np.linalg.norm(d, axis=-1) < cutoff)):
            if i != j or shift.any():
                found.add((int(i), int(j), tuple(int(s) for s in shift)))
    return found


def reference_energy(params, positions, numbers, cell, shifts, rounds=2, num_rbf=8):
    """The network re-implemented densely over all pairs and all `shifts` (M, 3) images (no neighbor list, no
    segment_sum)."""
    vectors = positions[None, :, None, :] + (shifts @ cell)[None, None] - positions[:, None, None, :]  # (N, N, M, 3)
    d2 = jnp.sum(vectors**2, -1)
    pair = (d2 > 1e-12) & (d2 < CUTOFF**2)
    r = jnp.sqrt(jnp.where(pair, d2, 1.0))
    fc = jnp.where(pair, 0.5 * (jnp.cos(jnp.pi * r / CUTOFF) + 1), 0.0)
    centers = jnp.linspace(0.0, CUTOFF, num_rbf)
    rbf = jnp.exp(-(((r[..., None] - centers) / (CUTOFF / (num_rbf - 1))) ** 2))
    h = params["species"]["embedding"][numbers]
    silu = jax.nn.silu
    for t in range(rounds):
        filt = (rbf @ params[f"filter_{t}"]["kernel"]) * fc[..., None]
        msg = jnp.einsum("ijmf,jf->if", filt, h @ params[f"neighbor_{t}"]["kernel"])
        inner = silu(msg @ params[f"update_{t}_in"]["kernel"] + params[f"update_{t}_in"]["bias"])
        h = h + inner @ params[f"update_{t}_out"]["kernel"] + params[f"update_{t}_out"]["bias"]
    out = silu(h @ params["energy_in"]["kernel"] + params["energy_in"]["bias"]) @ params["energy_out"]["kernel"]
    return jnp.sum(out[:, 0] + params["energy_out"]["bias"][0] + params["energy_ref"][numbers])


def strained_energy_derivative(energy, positions, cell, h=1e-6):
    """(1/V) dE/dε by central differences of `energy(positions, cell)` under positions @ (1+ε), cell @ (1+ε)."""
    out = np.zeros((3, 3))
    for a, b in itertools.product(range(3), repeat=2):
        sym = np.zeros((3, 3))
        sym[a, b] += 0.5
        sym[b, a] += 0.5
        up, down = np.eye(3) + h * sym, np.eye(3) - h * sym
        out[a, b] = (energy(positions @ up, cell @ up) - energy(positions @ down, cell @ down)) / (2 * h)
    return out / abs(np.linalg.det(cell))


def predict_inputs(positions, numbers, cell):
    i, j, s = neighbor_list(positions, cell, CUTOFF)
    return positions, numbers, cell, i, j, s


# -- the neighbor list ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["primitive", "small", "large"])
def test_neighbor_list_is_every_image_within_the_cutoff(kind):
    positions, _, cell = structure(kind)
    i, j, s = neighbor_list(positions, cell, CUTOFF)
    assert i.dtype == j.dtype == s.dtype == np.int32 and s.shape == (len(i), 3)
    listed = {(int(a), int(b), tuple(int(c) for c in row)) for a, b, row in zip(i, j, s)}
    assert len(listed) == len(i), "no pair listed twice"
    assert listed == brute_force_pairs(positions, cell, CUTOFF)
    if kind == "primitive":
        assert (i == j).all() and len(i) == 12, "one fcc atom: its 12 nearest images"


# -- physics against independent references (float64) -------------------------------------------------------

@pytest.mark.parametrize("kind", ["primitive", "small", "large"])
def test_energy_forces_stress_equal_all_pairs_all_images_reference(model, kind):
    task, params = model
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        positions, numbers, cell = structure(kind)
        energy, forces, stress, energies = jax.jit(task.predict)(p64, *predict_inputs(positions, numbers, cell))
        assert energy.dtype == forces.dtype == stress.dtype == jnp.float64
        images = jnp.asarray(np.stack(image_range(cell, CUTOFF)), jnp.float64)  # slack for the strains below
        ref = jax.jit(lambda x, c: reference_energy(p64, x, numbers, c, images))
        ref_energy = float(ref(positions, cell))
        ref_forces = -jax.jit(jax.grad(lambda x: reference_energy(p64, x, numbers, cell, images)))(positions)
        ref_stress = strained_energy_derivative(lambda x, c: float(ref(x, c)), positions, cell)
    np.testing.assert_allclose(float(energy), ref_energy, rtol=1e-12)
    np.testing.assert_allclose(forces, ref_forces, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(stress, ref_stress, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(energies).sum(), float(energy), rtol=1e-12)
    np.testing.assert_allclose(stress, stress.T, atol=1e-14)
    assert np.abs(stress).max() > 1e-4, "a non-trivial check"
    assert kind == "primitive" or np.abs(forces).max() > 1e-3, "(one atom feels no force from its own images)"


def test_stress_is_the_finite_difference_strain_derivative_of_predict(model):
    task, params = model
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        positions, numbers, cell = structure("small", seed=3)
        _, _, _, i, j, s = predict_inputs(positions, numbers, cell)
        predict = jax.jit(task.predict)
        stress = predict(p64, positions, numbers, cell, i, j, s)[2]
        numeric = strained_energy_derivative(lambda x, c: float(predict(p64, x, numbers, c, i, j, s)[0]),
                                             positions, cell)
    np.testing.assert_allclose(stress, numeric, rtol=1e-6, atol=1e-9)


def test_stress_convention_is_ases_get_stress():
    """ASE's EMT stress equals (1/V) dE/dε of EMT's energy with the strain applied as our predict applies it,
    and is negative (compressive) for a squeezed crystal: the same definition our stress is checked against."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    positions, numbers, cell = structure("small", seed=1)
    cell = 0.97 * cell  # squeezed: the crystal pushes outwards
    positions = 0.97 * positions
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.set_cell(cell)
    atoms.positions, atoms.numbers = positions, numbers
    atoms.calc = EMT()
    ase_stress = atoms.get_stress(voigt=False)

    def emt_energy(x, c):
        other = atoms.copy()
        other.set_cell(c)
        other.positions = x
        other.calc = EMT()
        return other.get_potential_energy()

    np.testing.assert_allclose(ase_stress, strained_energy_derivative(emt_energy, positions, cell, h=1e-5),
                               atol=1e-7)
    assert (np.diag(ase_stress) < 0).all()


def test_padding_atoms_and_edges_change_nothing_and_gradients_stay_finite(model):
    task, params = model
    positions, numbers, cell, i, j, s = predict_inputs(*structure("small", seed=2))
    positions, cell = positions.astype(np.float32), cell.astype(np.float32)
    predict = jax.jit(task.predict)
    energy, forces, stress, energies = predict(params, positions, numbers, cell, i, j, s)
    n = len(numbers)
    # Three padding atoms (number 0, anywhere), 40 padding edges onto atom 0 and onto a padding atom.
    pad_pos = np.concatenate([positions, np.random.default_rng(0).uniform(0, 3, (3, 3)).astype(np.float32)])
    pad_num = np.concatenate([numbers, np.zeros(3, np.int32)])
    pi, pj, ps = pad_edges(i, j, s, len(i) + 20)
    pi, pj, ps = pad_edges(pi, pj, ps, len(i) + 40)
    pi[len(i) + 20:] = pj[len(i) + 20:] = n + 1
    out = predict(params, pad_pos, pad_num, cell, pi, pj, ps)
    np.testing.assert_allclose(out[0], energy, rtol=1e-6)
    np.testing.assert_allclose(out[1][:n], forces, rtol=1e-5, atol=1e-6)
    assert not np.asarray(out[1][n:]).any() and not np.asarray(out[3][n:]).any()
    np.testing.assert_allclose(out[2], stress, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.sum(energies), energy, rtol=1e-6)
    # Gradients through the forces (what training differentiates) are finite despite the zero-length edges.
    grads = jax.jit(jax.grad(lambda p: jnp.sum(task.predict(p, pad_pos, pad_num, cell, pi, pj, ps)[1] ** 2)))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_a_zero_cell_is_non_periodic_with_zero_stress(model):
    task, params = model
    positions, numbers, _ = structure("large")
    i, j, s = neighbor_list(positions, np.zeros((3, 3)), CUTOFF, periodic=False)
    assert not s.any()
    energy, forces, stress, _ = jax.jit(task.predict)(params, positions.astype(np.float32), numbers,
                                                      np.zeros((3, 3), np.float32), i, j, s)
    assert np.isfinite(energy) and np.isfinite(forces).all() and not np.asarray(stress).any()
    np.testing.assert_allclose(np.asarray(forces).sum(0), 0, atol=1e-4)


# -- linear in atoms; export contract ------------------------------------------------------------------------

def test_edges_and_every_intermediate_are_linear_in_atoms(model):
    task, params = model
    per_atom = []
    for n in (64, 512, 4000):
        inputs = task.example_inputs(0, {"atoms": n})
        assert inputs[0].shape == (n, 3) and len(inputs[3]) == len(inputs[4]) == len(inputs[5])
        per_atom.append(len(inputs[3]) / n)
    assert max(per_atom) < 1.3 * min(per_atom), per_atom
    # No N x N (or N x E) intermediate anywhere in predict's graph, gradients included.
    n = 512
    inputs = task.example_inputs(0, {"atoms": n})
    e = len(inputs[3])
    jaxpr = jax.make_jaxpr(task.predict)(params, *inputs)
    for eqn in iter_eqns(jaxpr.jaxpr):
        for var in eqn.outvars:
            shape = tuple(getattr(var.aval, "shape", ()))
            assert sum(d in (n, e) for d in shape) <= 1, (eqn.primitive, shape)


def iter_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax_core.jaxprs_in_params(eqn.params):
            yield from iter_eqns(sub)


def test_example_inputs_and_export_with_symbolic_atoms_and_edges(model):
    task, params = model
    assert task.outputs == ("energy", "forces", "stress", "energies") and not task.has_forces
    assert task.cutoff == CUTOFF and task.atomic_energies is not None
    assert [s.shape for s in task.inputs] == [("atoms", 3), ("atoms",), (3, 3), ("edges",), ("edges",), ("edges", 3)]
    padded = task.example_inputs(0, {"atoms": 5, "edges": 500})
    assert len(padded[3]) == 500, "dims['edges'] is a minimum: the list is padded up to it"
    n, e = jax.export.symbolic_shape("n, e")
    dims = {"atoms": n, "edges": e}
    args = [jax.ShapeDtypeStruct(tuple(dims.get(d, d) for d in s.shape), s.dtype) for s in task.inputs]
    exported = jax.export.export(jax.jit(task.predict), platforms=("cpu",))(params, *args)
    predict = jax.jit(task.predict)
    for sizes in ({"atoms": 3, "edges": 100}, {"atoms": 32}):
        inputs = task.example_inputs(1, sizes)
        for got, want in zip(exported.call(params, *inputs), predict(params, *inputs)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        energies = task.atomic_energies(params, inputs[1], inputs[3], inputs[4],
                                        inputs[0][inputs[4]] - inputs[0][inputs[3]] + inputs[5] @ inputs[2])
        np.testing.assert_allclose(np.sum(energies), predict(params, *inputs)[0], rtol=1e-5)


# -- data and training ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    config = potential.get_config("tiny")
    dataset = load_dataset(config.data)
    task = build_task(config, dataset.info)
    return config, dataset, task, jax.jit(task.init)(jax.random.key(0))


def test_neighbor_dataset_is_padded_to_one_bucket_with_stress_labels(tiny):
    config, dataset, _, _ = tiny
    info = dataset.info
    n, e = info["num_atoms"], info["num_edges"]
    for split in (dataset.train, dataset.eval):
        shapes = {k: (v.shape[1:], v.dtype) for k, v in split.arrays.items()}
        assert shapes == {"positions": ((n, 3), np.float32), "numbers": ((n,), np.int32),
                          "cell": ((3, 3), np.float32), "energy": ((), np.float32), "forces": ((n, 3), np.float32),
                          "stress": ((3, 3), np.float32), "edge_i": ((e,), np.int32), "edge_j": ((e,), np.int32),
                          "shifts": ((e, 3), np.int32)}
    example = dataset.train[3]
    i, j, s = neighbor_list(example["positions"], example["cell"], config.data.cutoff)
    real = len(i)
    assert e % 64 == 0 and real <= e
    np.testing.assert_array_equal(example["edge_i"][:real], i)
    np.testing.assert_array_equal(example["shifts"][:real], s)
    assert not example["edge_i"][real:].any() and not example["edge_j"][real:].any()
    assert not example["shifts"][real:].any()
    assert info["stress_rms"] > 0 and info["zero_stress_mae"] > 0
    # The labels are plain EMT's `get_stress(voigt=False)` (the generator's EMT reuses neighbor lists).
    from ase import Atoms
    from ase.calculators.emt import EMT

    atoms = Atoms(numbers=example["numbers"], positions=example["positions"], cell=example["cell"], pbc=True)
    atoms.calc = EMT()
    np.testing.assert_allclose(example["stress"], atoms.get_stress(voigt=False), rtol=1e-4, atol=1e-6)


def test_small_cells_are_allowed_on_neighbor_lists_and_refused_by_the_dense_data(tiny):
    config = tiny[0].copy_and_resolve_references()
    config.data.update({"repeat": 1, "num_train": 8, "num_eval": 8})  # 4-atom cells, ~3.6 Å < 2 x 3.3 Å
    dataset = load_dataset(config.data)
    assert dataset.info["num_atoms"] == 4
    x = dataset.train[0]
    real = (x["edge_i"] != x["edge_j"]) | x["shifts"].any(-1)
    pairs = list(zip(x["edge_i"][real].tolist(), x["edge_j"][real].tolist()))
    assert len(pairs) == 48 and len(set(pairs)) == 12, "12 neighbors per atom: each of 3 others at 4 images"
    config.data.name = "molecules"
    with pytest.raises(TrainkitError, match="cutoff"):
        load_dataset(config.data)


def test_batched_padded_loss_equals_single_structure_predict(tiny):
    _, dataset, task, params = tiny
    batch = dataset.eval.take(np.arange(4))
    per = jax.jit(task.evaluate)(params, batch)
    assert set(per) == {"loss", "energy_mae", "force_mae", "stress_mae"}
    loss, metrics = jax.jit(task.loss)(params, batch, jax.random.key(0))
    np.testing.assert_allclose(metrics["loss"], per["loss"].mean(), rtol=1e-6)
    predict = jax.jit(task.predict)
    for b in range(4):
        x = dataset.eval[b]
        real = int(np.sum((x["edge_i"] != x["edge_j"]) | x["shifts"].any(-1)))
        energy, forces, stress, _ = predict(params, x["positions"], x["numbers"], x["cell"], x["edge_i"][:real],
                                            x["edge_j"][:real], x["shifts"][:real])
        np.testing.assert_allclose(per["energy_mae"][b], abs(energy - x["energy"]) / 32, rtol=1e-4)
        np.testing.assert_allclose(per["force_mae"][b], np.abs(forces - x["forces"]).mean(), rtol=1e-5)
        np.testing.assert_allclose(per["stress_mae"][b], np.abs(stress - x["stress"]).mean(), rtol=1e-5)
    grads = jax.jit(jax.grad(lambda p: task.loss(p, batch, None)[0]))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_the_neighbor_model_refuses_dense_batches(tiny):
    config = tiny[0].copy_and_resolve_references()
    config.data.name = "molecules"
    with pytest.raises(TrainkitError, match="data.name=neighbors"):
        build_task(config, load_dataset(config.data).info)


@pytest.mark.slow
def test_tiny_config_trains_through_the_cli(tmp_path):
    train(tmp_path, "--config.export.formats=()", config="configs/potential.py:tiny")
    records = read_metrics(tmp_path)
    evals = [r for r in records if "eval/force_mae" in r]
    assert evals and all(np.isfinite(r["eval/stress_mae"]) for r in evals), records
    assert any("train/stress_mae" in r for r in records)
