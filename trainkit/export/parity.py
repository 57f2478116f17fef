"""What every export is checked against: JAX's outputs (and forces) on inputs whose symbolic sizes differ from
the tracing example's, so that an artifact that only works at the traced sizes fails at export."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trainkit.errors import TrainkitError
from trainkit.export.formats import ArtifactSpec, Report, relative_error
from trainkit.models import Task

TRACE_DIMS = {"batch": 2, "atoms": 8, "seq": 8}
CHECK_DIMS = {"batch": 3, "atoms": 12, "seq": 12}


def output_names(task: Task) -> list[str]:
    """What a model-running artifact returns, in order: the task's outputs, then "forces" for a task whose forces
    are -d(output 0)/d(input 0) (`has_forces`); a neighbor-list potential predicts its forces itself."""
    return [*task.outputs, "forces"] if task.has_forces else list(task.outputs)


def reference(task: Task, params: Any, args: tuple) -> dict[str, np.ndarray]:
    """JAX's outputs by name (`output_names`)."""
    out = jax.jit(task.predict)(params, *args)
    outs = [np.asarray(o) for o in (out if isinstance(out, (tuple, list)) else [out])]
    if task.has_forces:
        grad = jax.grad(lambda x: jnp.sum(task.predict(params, x, *args[1:])))(args[0])
        outs.append(np.asarray(-grad))
    return dict(zip(output_names(task), outs))


def measure(spec: ArtifactSpec, got: Mapping[str, np.ndarray]) -> Report:
    """An artifact's outputs on `spec.args` against JAX's, every output of `spec.ref` by name: "forces" in the
    forces fields, the worst of the others in max_abs/max_rel."""
    missing = sorted(set(spec.ref) - set(got))
    if missing:
        raise TrainkitError(f"export parity: the artifact did not return {missing}")
    errors = {name: relative_error(ref, got[name]) for name, ref in spec.ref.items()}
    forces = errors.pop("forces", None)
    max_abs = max((e[0] for e in errors.values()), default=0.0)
    max_rel = max((e[1] for e in errors.values()), default=0.0)
    return Report(max_abs, max_rel) if forces is None else Report(max_abs, max_rel, *forces)
