"""What every export is checked against: JAX's outputs (and forces) on inputs whose symbolic sizes differ from
the tracing example's, so that an artifact that only works at the traced sizes fails at export."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trainkit.export.formats import ArtifactSpec, Report, relative_error
from trainkit.models import Task

TRACE_DIMS = {"batch": 2, "atoms": 8, "seq": 8}
CHECK_DIMS = {"batch": 3, "atoms": 12, "seq": 12}


def reference(task: Task, params: Any, args: tuple) -> tuple[np.ndarray, np.ndarray | None]:
    """JAX's outputs (first output) and, for potentials, forces = -dE/d(first input)."""
    out = jax.jit(task.predict)(params, *args)
    first = out[0] if isinstance(out, (tuple, list)) else out
    forces = None
    if task.has_forces:
        grad = jax.grad(lambda x: jnp.sum(task.predict(params, x, *args[1:])))(args[0])
        forces = np.asarray(-grad)
    return np.asarray(first), forces


def measure(spec: ArtifactSpec, got: np.ndarray, forces: np.ndarray | None = None) -> Report:
    """An artifact's outputs (and forces, for potentials) on `spec.args` against JAX's."""
    max_abs, max_rel = relative_error(spec.ref, got)
    if spec.ref_forces is None:
        return Report(max_abs, max_rel)
    return Report(max_abs, max_rel, *relative_error(spec.ref_forces, forces))
