"""Consolidated weights: every parameter of a (possibly sharded) checkpoint as one `model.safetensors`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np


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


def write_safetensors(params: Any, path: Path, sidecar: Mapping[str, Any]) -> dict[str, float]:
    """Write the full, unsharded arrays with the sidecar in the metadata; returns the read-back parity."""
    from safetensors.numpy import load_file, save_file

    tensors = flat_names(params)
    save_file(tensors, str(path), metadata={"trainkit": json.dumps(sidecar)})
    loaded = load_file(str(path))
    worst = max((float(np.max(np.abs(loaded[k].astype(np.float64) - v.astype(np.float64)), initial=0.0))
                 for k, v in tensors.items()), default=0.0)
    return {"max_abs": worst, "max_rel": worst, "tensors": len(tensors)}
