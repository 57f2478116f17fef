"""The `pt` row of `FORMATS`: a Task as a standalone TorchScript `.pt` (torch only), built with
`trainkit.export.torchscript` and carrying the sidecar as the extra file `model.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainkit.export.formats import ArtifactSpec, Report
from trainkit.export.parity import TRACE_DIMS, measure, output_names
from trainkit.export.torchscript import call_repeatedly, to_torchscript
from trainkit.models import Task


def write_torchscript(task: Task, params: Any, path: Path, spec: ArtifactSpec) -> Report:
    """Translate `task.predict` with `params` (traced at TRACE_DIMS, symbolic dims kept dynamic), check it on
    `spec.args`, and save it with the sidecar, parity included, embedded."""
    trace_args = task.example_inputs(0, TRACE_DIMS)
    axes = [{i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in task.inputs]
    # parity_tolerance=None: the one check is below, on spec.args, whose sizes differ from the traced ones (the
    # converter's own check runs at the traced sizes, and with a looser tolerance).
    module = to_torchscript(
        task.predict, params, trace_args, dynamic_axes=axes, input_names=[s.name for s in task.inputs],
        output_names=list(task.outputs), with_forces=task.has_forces, parity_tolerance=None,
    )
    tensors = [torch.from_numpy(np.array(a, copy=True)) for a in spec.args]  # keeps 0-d inputs 0-d
    out = call_repeatedly(module, tensors)
    report = measure(spec, {name: o.numpy() for name, o in zip(output_names(task), out)})
    embedded = {**spec.metadata, "parity": report.as_dict(), "file": spec.file}
    torch.jit.save(module, str(path), _extra_files={"model.json": json.dumps(embedded)})
    return report
