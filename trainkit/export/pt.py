"""The `pt` row of `FORMATS`: a Task as a standalone TorchScript `.pt` (torch only), built with
`trainkit.export.torchscript` and carrying the sidecar as the extra file `model.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from trainkit.export.formats import ArtifactSpec, Report
from trainkit.export.parity import TRACE_DIMS, measure, output_names
from trainkit.export.torchscript import call_repeatedly, to_torchscript
from trainkit.export.torchscript.checks import to_tensor
from trainkit.models import Task


def write_torchscript(task: Task, params: Any, path: Path, spec: ArtifactSpec) -> Report:
    """Translate `task.predict` with `params` (traced at TRACE_DIMS, symbolic dims kept dynamic), check it on
    `spec.args`, and save it with the sidecar, parity included, embedded."""
    # parity_tolerance=None: the one check is `measured`, on spec.args, whose sizes differ from the traced ones (the
    # converter's own check runs at the traced sizes, and with a looser tolerance).
    module = to_torchscript(task.predict, params, **translation_args(task), parity_tolerance=None)
    report = measured(task, spec, module)
    embedded = {**spec.metadata, "parity": report.as_dict(), "file": spec.file}
    torch.jit.save(module, str(path), _extra_files={"model.json": json.dumps(embedded)})
    return report


def translation_args(task: Task) -> dict[str, Any]:
    """What the converters (`to_torchscript`, `to_torch_export`) are given for a Task: its example inputs at
    TRACE_DIMS, its symbolic dims as dynamic axes, its input and output names, forces if it has them."""
    return {"example_args": task.example_inputs(0, TRACE_DIMS),
            "dynamic_axes": [{i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in task.inputs],
            "input_names": [s.name for s in task.inputs], "output_names": list(task.outputs),
            "with_forces": task.has_forces}


def measured(task: Task, spec: ArtifactSpec, run: Callable[..., Any]) -> Report:
    """The artifact's parity on `spec.args`, every output by name, called REPEAT_CALLS times (same bits each)."""
    out = call_repeatedly(run, [to_tensor(a) for a in spec.args])
    return measure(spec, {name: o.numpy() for name, o in zip(output_names(task), out)})
