"""Consolidated weights: every parameter of a (possibly sharded) checkpoint as one `model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from trainkit.export.formats import ArtifactSpec, Report

if TYPE_CHECKING:
    from trainkit.models import Task


def flat_names(tree: Any, prefix: str = "params") -> dict[str, np.ndarray]:
    """{"params.Dense_0.kernel": array, ...} — the names OpenTau/HF users expect."""
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(flat_names(v, f"{prefix}.{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flat_names(v, f"{prefix}.{i}"))
    elif tree is not None:
        out[prefix] = np.ascontiguousarray(np.asarray(tree))
    return out


def write_safetensors(task: Task, params: Any, path: Path, spec: ArtifactSpec) -> Report:
    """The `safetensors` row of `FORMATS`: the full, unsharded arrays with the sidecar so far in the metadata.
    Weights run nothing, so the one check is the file read back against `params`."""
    from safetensors.numpy import load_file, save_file

    tensors = flat_names(params)
    save_file(tensors, str(path), metadata={"trainkit": json.dumps(spec.metadata)})
    loaded = load_file(str(path))
    worst = max((float(np.max(np.abs(loaded[k].astype(np.float64) - v.astype(np.float64)), initial=0.0))
                 for k, v in tensors.items()), default=0.0)
    return Report(max_abs=worst, max_rel=worst, tensors=len(tensors))
