"""Rattled periodic metal cells labelled by ASE's EMT calculator: energies (eV), forces (eV/Å), stress (eV/Å³).

Each structure is an fcc supercell (`repeat`³ conventional cells, 32 atoms for repeat=2) with random
occupation by `elements` (e.g. a Cu/Ni alloy of random composition), a random strain (isotropic scale and a
small symmetric shear) and Gaussian displacements ("rattle") of a few sizes. A group of `rattles_per_cell`
structures shares one strained, decorated cell (EMT's neighbour list is the slow part of labelling); the
train and eval splits come from different seeds, so they never share a cell.
Everything follows from `config.data.seed`: the same config gives the same arrays, bit for bit, within a run
or across runs. Generated in memory (~2.5 s of CPU for the default 384 structures) and cached per process;
nothing is written to disk.

Batches are dense: positions (B, N, 3) float32, numbers (B, N) int32, cell (B, 3, 3) float32 (rows are
lattice vectors), energy (B,) float32, forces (B, N, 3) float32. The generator also labels stress (ASE's
`get_stress(voigt=False)`, (3, 3) eV/Å³), which the neighbor-list batches (`trainkit.data.neighbors`) carry;
the dense batches leave it out, as the dense model has no stress.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from trainkit.data import ArraySource, Dataset
from trainkit.errors import TrainkitError


def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of the cell(s) `(..., 3, 3)`: minimum image is exact below half."""
    volume = np.abs(np.linalg.det(cell))
    faces = np.stack([np.cross(cell[..., (i + 1) % 3, :], cell[..., (i + 2) % 3, :]) for i in range(3)], -2)
    return volume[..., None] / np.linalg.norm(faces, axis=-1)


def _emt_calculator():
    """ASE's EMT with a 1 Å neighbour-list skin, so the rattles of one cell reuse one list (~2x faster).

    Exact: EMT masks neighbours by its own cutoff, and the list is rebuilt once any atom moves by > skin.
    Falls back to plain EMT if a future ASE changes the internals this relies on.
    """
    from ase.calculators.emt import EMT
    from ase.neighborlist import NeighborList

    class SkinnedEMT(EMT):
        def initialize(self, atoms):
            super().initialize(atoms)
            if hasattr(self, "rc_list") and hasattr(self, "nl"):
                self.nl = NeighborList([0.5 * self.rc_list] * len(atoms), skin=1.0,
                                       self_interaction=False, bothways=True)

    return SkinnedEMT()


DENSE_KEYS = ("positions", "numbers", "cell", "energy", "forces")


def _generate(elements: tuple[str, ...], repeat: int, count: int, rattles_per_cell: int,
              rattle: tuple[float, ...], strain: float, seed: int) -> dict[str, np.ndarray]:
    from ase.build import bulk  # ASE imports take ~0.5 s: only when this dataset is used
    from ase.data import atomic_numbers, reference_states

    numbers = [atomic_numbers[e] for e in elements]
    lattice = np.array([reference_states[z]["a"] for z in numbers])
    template = bulk("Cu", "fcc", a=1.0, cubic=True).repeat((repeat,) * 3)  # unit lattice, scaled below
    rng = np.random.default_rng(seed)
    out: dict[str, list[Any]] = {k: [] for k in (*DENSE_KEYS, "stress")}
    while len(out["energy"]) < count:
        atoms = template.copy()
        fraction = rng.dirichlet(np.ones(len(numbers)))
        species = rng.choice(len(numbers), size=len(atoms), p=fraction)
        atoms.numbers = np.asarray(numbers)[species]
        shear = rng.uniform(-strain / 2, strain / 2, (3, 3))
        deform = (1.0 + rng.uniform(-strain, strain)) * np.eye(3) + (shear + shear.T) / 2
        a = lattice[species].mean()  # Vegard's law for the alloy's lattice constant
        atoms.set_cell(np.asarray(atoms.cell) * a @ deform, scale_atoms=True)
        atoms.calc = _emt_calculator()
        ideal = atoms.positions.copy()
        for k in range(min(rattles_per_cell, count - len(out["energy"]))):
            atoms.positions = ideal + rng.normal(0.0, rattle[k % len(rattle)], ideal.shape)
            out["positions"].append(atoms.positions.copy())
            out["numbers"].append(atoms.numbers.copy())
            out["cell"].append(np.asarray(atoms.cell).copy())
            out["energy"].append(atoms.get_potential_energy())
            out["forces"].append(atoms.get_forces())
            out["stress"].append(atoms.get_stress(voigt=False))  # same EMT pass as the forces: free
    dtypes = {"numbers": np.int32}
    arrays = {k: np.asarray(v, dtype=dtypes.get(k, np.float32)) for k, v in out.items()}
    for v in arrays.values():
        v.setflags(write=False)  # shared through the cache
    return arrays


@functools.lru_cache(maxsize=8)
def generate(elements: tuple[str, ...] = ("Cu", "Ni"), repeat: int = 2, count: int = 64,
             rattles_per_cell: int = 8, rattle: tuple[float, ...] = (0.03, 0.06, 0.1, 0.15),
             strain: float = 0.03, seed: int = 0) -> dict[str, np.ndarray]:
    """`count` labelled structures (see the module docstring); cached, so the arrays are read-only."""
    return _generate(elements, repeat, count, rattles_per_cell, rattle, strain, seed)


def fit_reference_energies(numbers: np.ndarray, energy: np.ndarray, species: Sequence[int]) -> np.ndarray:
    """Per-species energies e_s (eV/atom) minimising sum over structures of (E - sum_s n_s e_s)^2."""
    counts = np.stack([(numbers == z).sum(-1) for z in species], -1).astype(np.float64)
    ref, *_ = np.linalg.lstsq(counts, energy.astype(np.float64), rcond=None)
    return ref


def labelled_splits(config: ml_collections.ConfigDict) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The (train, eval) structures of `config.data` (keys: elements, repeat, num_train, num_eval,
    rattles_per_cell, rattle, strain, seed), generated with different seeds."""
    common = {
        "elements": tuple(config.elements),
        "repeat": int(config.repeat),
        "rattles_per_cell": int(config.rattles_per_cell),
        "rattle": tuple(float(r) for r in config.rattle),
        "strain": float(config.strain),
    }
    seed = int(config.get("seed", 0))
    train = generate(count=int(config.num_train), seed=2 * seed, **common)
    evals = generate(count=int(config.num_eval), seed=2 * seed + 1, **common)
    return train, evals


def potential_info(train: dict[str, np.ndarray], evals: dict[str, np.ndarray], cutoff: float) -> dict[str, Any]:
    """What sizes and normalises a potential (species, reference energies, scales) and the baselines a trained
    model must beat, from unpadded (S, N, ...) splits."""
    species = sorted(int(z) for z in np.unique(train["numbers"]))
    ref = fit_reference_energies(train["numbers"], train["energy"], species)

    def residual_per_atom(split: dict[str, np.ndarray]) -> np.ndarray:
        expected = sum(r * (split["numbers"] == z).sum(-1) for z, r in zip(species, ref))
        return (split["energy"] - expected) / split["numbers"].shape[1]

    return {
        "species": species,
        "energy_ref": [float(r) for r in ref],  # eV/atom per species, aligned with `species`
        "cutoff": float(cutoff),
        "num_atoms": train["numbers"].shape[1],
        "energy_scale": float(residual_per_atom(train).std()),  # eV/atom
        "force_rms": float(np.sqrt(np.mean(train["forces"].astype(np.float64) ** 2))),  # eV/Å per component
        # Baselines on the eval set: predicting zero forces / only the per-species reference energies.
        "zero_force_mae": float(np.mean(np.abs(evals["forces"]))),
        "reference_energy_mae": float(np.mean(np.abs(residual_per_atom(evals)))),
    }


def load(config: ml_collections.ConfigDict) -> Dataset:
    """config.data keys: those of `labelled_splits` and the cutoff, which must stay below half of every cell's
    width (the dense model uses minimum image). `info` as `potential_info`."""
    train, evals = labelled_splits(config)
    cutoff = float(config.cutoff)
    width = min(perpendicular_widths(split["cell"].astype(np.float64)).min() for split in (train, evals))
    if width <= 2 * cutoff:
        raise TrainkitError(
            f"a generated cell is only {width:.2f} Å wide, not more than 2 x cutoff={cutoff} Å, so the "
            "minimum-image convention would miss neighbours; lower --config.data.cutoff or "
            "--config.data.strain, raise --config.data.repeat, or use neighbor lists (configs/potential.py)"
        )
    dense = [{k: split[k] for k in DENSE_KEYS} for split in (train, evals)]
    return Dataset(train=ArraySource(dense[0]), eval=ArraySource(dense[1]), info=potential_info(train, evals, cutoff))
