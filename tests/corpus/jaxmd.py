"""jax-md potentials: Lennard-Jones, Morse and soft-sphere pair energies under a periodic displacement, in dense
(all pairs) and neighbor-list form, and a Behler-Parrinello network, each exported with forces.

Neighbor-list form: jax-md's Dense neighbor-list format, built outside the export (as an MD driver would) with a
fixed capacity per atom and passed in as an int input `idx` of shape (atoms, capacity); padding entries equal the
atom count, which jax-md masks (`idx < N`). The energy function is jax-md's `*_neighbor_list` energy, called on a
`NeighborList` whose idx is the input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax_md import energy, partition, space

from . import Case, case, cast, np_dtype, rng

BOX = 6.0
CAPACITY = 24


def _positions(dtype, seed, n):
    """n atoms on a jittered lattice in the periodic box: no two closer than ~0.8 (LJ/Morse stay moderate)."""
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    r = (grid + 0.5) * (BOX / side) + 0.15 * rng(seed).standard_normal((n, 3))
    return np.mod(r, BOX).astype(np_dtype(dtype))


def _dense_idx(r, cutoff):
    """jax-md's Dense neighbor format by brute force: per atom the indices of the others within cutoff, padded
    with N to CAPACITY."""
    n = len(r)
    d = r[:, None, :] - r[None, :, :]
    d -= BOX * np.round(d / BOX)
    dist = np.sqrt((d.astype(np.float64) ** 2).sum(-1))
    idx = np.full((n, CAPACITY), n, np.int32)
    for i in range(n):
        js = [j for j in np.argsort(dist[i]) if j != i and dist[i, j] < cutoff]
        assert len(js) <= CAPACITY
        idx[i, :len(js)] = js
    return idx


PAIRS = {
    "lj": (energy.lennard_jones_pair, energy.lennard_jones_neighbor_list,
           dict(sigma=1.0, epsilon=1.0, r_onset=2.0, r_cutoff=2.5)),
    "morse": (energy.morse_pair, energy.morse_neighbor_list,
              dict(sigma=1.1, epsilon=2.0, alpha=3.0, r_onset=2.0, r_cutoff=2.5)),
    "soft_sphere": (energy.soft_sphere_pair, energy.soft_sphere_neighbor_list, dict(sigma=3.2, epsilon=1.5)),
}


def _register(kind: str, dense_fn, nl_fn, kw):
    @case(f"jaxmd_{kind}_dense")
    def dense(dtype):
        displacement, _ = space.periodic(BOX)
        energy_fn = dense_fn(displacement, **kw)

        def fn(params, r):
            return energy_fn(r)
        return Case("", fn, {}, (_positions(dtype, 1, 8),), (_positions(dtype, 2, 13),), [{0: "atoms"}],
                    with_forces=True)

    @case(f"jaxmd_{kind}_neighbor_list")
    def neighbor_list(dtype):
        displacement, _ = space.periodic(BOX)
        cutoff = kw.get("r_cutoff", kw["sigma"])
        extra = {} if kind == "soft_sphere" else {"dr_threshold": 0.0}
        _, energy_fn = nl_fn(displacement, BOX, format=partition.Dense, **kw, **extra)
        r1, r2 = _positions(dtype, 3, 8), _positions(dtype, 4, 13)

        def fn(params, r, idx):
            nbrs = partition.NeighborList(idx=idx, reference_position=r, error=partition.PartitionError(
                jnp.zeros((), jnp.uint8)), cell_list_capacity=None, max_occupancy=CAPACITY, format=partition.Dense,
                cell_size=None, cell_list_fn=None, update_fn=None)
            return energy_fn(r, nbrs)
        return Case("", fn, {}, (r1, _dense_idx(r1, cutoff)), (r2, _dense_idx(r2, cutoff)),
                    [{0: "atoms"}, {0: "atoms"}], with_forces=True)


for _kind, (_dense, _nl, _kw) in PAIRS.items():
    _register(_kind, _dense, _nl, _kw)


@case("jaxmd_behler_parrinello")
def behler_parrinello(dtype):
    """jax-md's Behler-Parrinello network (an nnx module): fn(state, r) via nnx.split/merge."""
    displacement, _ = space.periodic(BOX)
    energy_fn = energy.behler_parrinello(displacement, key=jax.random.PRNGKey(0), mlp_sizes=(16, 16))
    graphdef, state = nnx.split(energy_fn.model)
    state = cast(state, dtype)

    def fn(p, r):
        return nnx.merge(graphdef, p)(r)
    return Case("", fn, state, (_positions(dtype, 5, 8),), (_positions(dtype, 6, 12),), [{0: "atoms"}],
                with_forces=True)
