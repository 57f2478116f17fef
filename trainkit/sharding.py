"""The one place that builds the mesh and the shardings of state and batches.

Mesh axes are ("data", "fsdp", "model"). Batches are split over data x fsdp. Each state leaf is sharded by:
  1. the task's tensor-parallel rules (regex on the leaf path -> per-dim axes, e.g. attention kernels on "model"),
  2. fsdp: the largest dimension still free and divisible by the fsdp size goes on "fsdp".
Optimizer-state leaves carry their parameter's path (`opt_state/0/mu/Dense_0/kernel`), so they follow their
parameters with no extra bookkeeping; scalars (step, counts) and the RNG are replicated.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trainkit.errors import TrainkitError

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(config: ml_collections.ConfigDict, device_count: int) -> tuple[int, int, int]:
    """Resolve `mesh.data/fsdp/model` (-1 = the rest) against the device count, or explain why not."""
    sizes = [int(config[a]) for a in AXES]
    asked = ", ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise TrainkitError(f"mesh ({asked}) is invalid: sizes must be positive, at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if device_count % known:
        raise TrainkitError(
            f"mesh ({asked}) does not divide the {device_count} available devices; "
            f"choose sizes whose product divides {device_count} (e.g. --config.mesh.data=-1)"
        )
    resolved = tuple(device_count // known if s == -1 else s for s in sizes)
    if math.prod(resolved) != device_count:
        raise TrainkitError(
            f"mesh ({asked}) uses {math.prod(resolved)} of the {device_count} devices; "
            f"set one axis to -1 or make the product {device_count}"
        )
    return resolved  # type: ignore[return-value]


def build_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % parallel:
        raise TrainkitError(
            f"batch_size={batch_size} is not divisible by the data-parallel size {parallel} "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); use a multiple of {parallel}"
        )
    if batch_size % jax.process_count():
        raise TrainkitError(
            f"batch_size={batch_size} is not divisible by the {jax.process_count()} processes"
        )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def path_name(path: tuple[Any, ...]) -> str:
    """A pytree key path as "opt_state/0/mu/Dense_0/kernel"."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def leaf_spec(
    name: str, shape: tuple[int, ...], mesh: Mesh, rules: Sequence[tuple[str, tuple[str | None, ...]]]
) -> P:
    spec: list[str | None] = [None] * len(shape)
    for pattern, axes in rules:
        if re.search(pattern, name) and len(axes) == len(shape):
            spec = [a if a is None or shape[i] % mesh.shape[a] == 0 else None for i, a in enumerate(axes)]
            break
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1:
        free = [i for i, d in enumerate(shape) if spec[i] is None and d % fsdp == 0 and d >= fsdp]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, tuple[str | None, ...]]] = ()):
    """NamedShardings for every leaf of `abstract_state` (arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        if leaf.ndim == 0 or path_name(path).startswith("rng"):
            return replicated(mesh)
        return NamedSharding(mesh, leaf_spec(path_name(path), tuple(leaf.shape), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assemble process-local numpy batches into global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
