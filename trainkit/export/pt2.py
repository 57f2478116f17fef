"""The `pt2` and `aoti` rows of `FORMATS`: a Task as a `torch.export` program (`model.pt2`, torch only:
`torch.export.load(path).module()`), or that program compiled by AOTInductor for this machine
(`model.aoti.pt2`: `torch._inductor.aoti_load_package(path)`, or C++'s `AOTIModelPackageLoader`).

The program carries the sidecar, parity included, as the extra file `model.json`; the package carries it,
without the parity (measured after compiling), as its metadata entry `trainkit.model_json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainkit.export.formats import ArtifactSpec, Report
from trainkit.export.parity import TRACE_DIMS, measure, output_names
from trainkit.export.torchscript import call_repeatedly, to_torch_export
from trainkit.models import Task

PACKAGE_METADATA = "trainkit.model_json"


def write_pt2(task: Task, params: Any, path: Path, spec: ArtifactSpec) -> Report:
    """A `.pt2` ExportedProgram: dynamic dims as `torch.export.Dim`s, control flow as higher-order ops."""
    return _write(task, params, path, spec, compile=False)


def write_aoti(task: Task, params: Any, path: Path, spec: ArtifactSpec) -> Report:
    """An AOTInductor package compiled for this machine (its target recorded in the sidecar)."""
    return _write(task, params, path, spec, compile=True)


def _write(task: Task, params: Any, path: Path, spec: ArtifactSpec, compile: bool) -> Report:
    trace_args = task.example_inputs(0, TRACE_DIMS)
    axes = [{i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in task.inputs]
    embedded = {**spec.metadata, "file": spec.file}
    # parity_tolerance=None: the one check is below, on spec.args (other sizes than the traced ones).
    export = to_torch_export(
        task.predict, params, trace_args, str(path) if compile else None, dynamic_axes=axes,
        input_names=[s.name for s in task.inputs], output_names=list(task.outputs), with_forces=task.has_forces,
        parity_tolerance=None, compile=compile, extra_files={PACKAGE_METADATA: json.dumps(embedded)},
    )
    tensors = [torch.from_numpy(np.array(a, copy=True)) for a in spec.args]  # keeps 0-d inputs 0-d
    out = call_repeatedly(export, tensors)
    report = measure(spec, {name: o.numpy() for name, o in zip(output_names(task), out)})
    spec.facts.update(dims=export.dims, control_flow=export.control_flow)
    if compile:
        spec.facts["target"] = export.target
    else:
        embedded.update(parity=report.as_dict(), **spec.facts)
        torch.export.save(export.program, str(path), extra_files={"model.json": json.dumps(embedded)})
    return report
