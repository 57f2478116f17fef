"""Serialized StableHLO via `jax.export`: symbolic batch/atom dims, cpu+cuda+tpu, VJP kept for forces.

Load it back without trainkit:

    exported = jax.export.deserialize(open("model.stablehlo", "rb").read())
    energy = exported.call(positions, numbers, cell)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trainkit.export.formats import ArtifactSpec, Report
from trainkit.export.parity import measure, output_names
from trainkit.models import InputSpec, Task

PLATFORMS = ("cpu", "cuda", "tpu")


def symbolic_specs(inputs: Sequence[InputSpec]) -> list[jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs with one shared symbolic scope: equal names are equal sizes across inputs."""
    names = list(dict.fromkeys(d for spec in inputs for d in spec.shape if isinstance(d, str)))
    dims = dict(zip(names, jax.export.symbolic_shape(", ".join(names)))) if names else {}
    return [jax.ShapeDtypeStruct(tuple(dims[d] if isinstance(d, str) else d for d in spec.shape),
                                 np.dtype(spec.dtype)) for spec in inputs]


def export_stablehlo(fn: Callable[..., Any], inputs: Sequence[InputSpec], path: Path) -> bytes:
    """Serialize `fn(*inputs)` (params closed over) for every platform, with first-order gradients."""
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(*symbolic_specs(inputs))
    blob = bytes(exported.serialize(vjp_order=1))
    Path(path).write_bytes(blob)
    return blob


def load_stablehlo(path: Path) -> jax.export.Exported:
    return jax.export.deserialize(bytearray(Path(path).read_bytes()))


def write_stablehlo(task: Task, params: Any, path: Path, spec: ArtifactSpec) -> Report:
    """The `stablehlo` row of `FORMATS`: serialize `task.predict` with `params`, then check the file read back."""
    export_stablehlo(lambda *a: task.predict(params, *a), task.inputs, path)
    exported = load_stablehlo(path)  # check what was written, not what is in memory
    out = exported.call(*spec.args)
    outs = [np.asarray(o) for o in (out if isinstance(out, (tuple, list)) else [out])]
    if task.has_forces:
        grad = jax.grad(lambda x: jnp.sum(exported.call(x, *spec.args[1:])))(spec.args[0])
        outs.append(-np.asarray(grad))
    return measure(spec, dict(zip(output_names(task), outs)))
