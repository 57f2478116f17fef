"""The EMT metal cells of `trainkit.data.molecules` as neighbor-list batches, padded to fixed buckets.

Each structure carries its full neighbor list at `config.data.cutoff`: every ordered pair (i, j) and integer
cell shift S with |r_j - r_i + S @ cell| < cutoff, both directions, and one entry per periodic image, so the
list is exact for any cutoff relative to the cell (a cell narrower than twice the cutoff gives several images
of the same neighbor, and an atom can neighbor its own images). Built with vesin, the fastest of the maintained
libraries on these cells (ms per list, 2 CPU cores; all three give the same pairs):

    atoms (edges)            vesin 0.6   matscipy 1.3   ase.neighborlist
    4 (48), 3.6 Å cell       0.08        0.03           2.8
    32 (386)                 0.15        0.19           4.9
    4000 (48,326)            8.2         23.7           528

Batches are B structures padded to one bucket per dataset (atoms: the largest structure; edges: the longest
list of either split rounded up to a multiple of EDGE_ROUND), so jit compiles one train and one eval step:
positions (B, N, 3) float32, numbers (B, N) int32 (0: padding atom), cell (B, 3, 3) float32, edge_i, edge_j
(B, E) int32, shifts (B, E, 3) int32 (padding edge: i = j = 0 with zero shift, i.e. a zero vector), energy (B,)
eV, forces (B, N, 3) eV/Å, stress (B, 3, 3) eV/Å³ (ASE's sign: `atoms.get_stress(voigt=False)`).
"""

from __future__ import annotations

import functools
import json

import ml_collections
import numpy as np

from trainkit.data import ArraySource, Dataset
from trainkit.data import molecules

EDGE_ROUND = 64


def neighbor_list(positions: np.ndarray, cell: np.ndarray, cutoff: float,
                  periodic: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full neighbor list (edge_i, edge_j, shifts) as int32 arrays (E,), (E,), (E, 3) of one structure:
    vectors = positions[edge_j] - positions[edge_i] + shifts @ cell. Non-periodic: a zero cell, zero shifts.

        i, j, s = neighbor_list(atoms.positions, atoms.cell.array, 3.3)
    """
    import vesin  # a compiled extension: imported with the datasets and models that use it

    points = np.ascontiguousarray(positions, dtype=np.float64)
    box = np.ascontiguousarray(cell if periodic else np.zeros((3, 3)), dtype=np.float64)
    i, j, shifts = vesin.NeighborList(cutoff=float(cutoff), full_list=True).compute(
        points, box, periodic, quantities="ijS")
    return i.astype(np.int32), j.astype(np.int32), shifts.astype(np.int32).reshape(-1, 3)


def pad_edges(edge_i: np.ndarray, edge_j: np.ndarray, shifts: np.ndarray,
              num_edges: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The list padded to `num_edges` with zero-length edges (i = j = 0, zero shift), which add nothing."""
    pad = num_edges - len(edge_i)
    assert pad >= 0, (len(edge_i), num_edges)
    return (np.concatenate([edge_i, np.zeros(pad, np.int32)]), np.concatenate([edge_j, np.zeros(pad, np.int32)]),
            np.concatenate([shifts, np.zeros((pad, 3), np.int32)]))


def _lists(split: dict[str, np.ndarray], cutoff: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    # From the float32 positions the model sees, so list and model agree on every pair inside the cutoff.
    return [neighbor_list(p, c, cutoff) for p, c in zip(split["positions"], split["cell"])]


def _padded(split: dict[str, np.ndarray], lists: list, num_edges: int) -> dict[str, np.ndarray]:
    padded = [pad_edges(*edges, num_edges) for edges in lists]
    arrays = {k: split[k] for k in (*molecules.DENSE_KEYS, "stress")}
    for k, col in zip(("edge_i", "edge_j", "shifts"), zip(*padded)):
        arrays[k] = np.stack(col)
    for v in arrays.values():
        v.setflags(write=False)
    return arrays


@functools.lru_cache(maxsize=8)
def _load(config_json: str) -> Dataset:
    config = ml_collections.ConfigDict(json.loads(config_json))
    train, evals = molecules.labelled_splits(config)
    cutoff = float(config.cutoff)
    lists = {"train": _lists(train, cutoff), "eval": _lists(evals, cutoff)}
    longest = max(len(i) for split in lists.values() for i, _, _ in split)
    num_edges = -(-longest // EDGE_ROUND) * EDGE_ROUND
    info = molecules.potential_info(train, evals, cutoff)
    info.update({
        "num_edges": num_edges,
        "stress_rms": float(np.sqrt(np.mean(train["stress"].astype(np.float64) ** 2))),  # eV/Å³ per component
        "zero_stress_mae": float(np.mean(np.abs(evals["stress"]))),
    })
    return Dataset(train=ArraySource(_padded(train, lists["train"], num_edges)),
                   eval=ArraySource(_padded(evals, lists["eval"], num_edges)), info=info)


def load(config: ml_collections.ConfigDict) -> Dataset:
    """config.data keys: those of `trainkit.data.molecules` (elements, repeat, num_train, num_eval,
    rattles_per_cell, rattle, strain, cutoff, seed); any cutoff. `info` adds `num_edges` (the edge bucket),
    `stress_rms` and `zero_stress_mae` (eV/Å³) to the molecules' info. Cached per process."""
    return _load(config.to_json(sort_keys=True))  # JSON: a hashable cache key
