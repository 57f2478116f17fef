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

import torch

from trainkit.export.formats import ArtifactSpec, Report
from trainkit.export.pt import measured, translation_args
from trainkit.export.torchscript import to_torch_export
from trainkit.models import Task

PACKAGE_METADATA = "trainkit.model_json"


def write_pt2(task: Task, params: Any, path: Path, spec: ArtifactSpec) -> Report:
    """A `.pt2` ExportedProgram: dynamic dims as `torch.export.Dim`s, control flow as higher-order ops."""
    return _write(task, params, path, spec, compile=False)


def write_aoti(task: Task, params: Any, path: Path, spec: ArtifactSpec) -> Report:
    """An AOTInductor package compiled for this machine (its target recorded in the sidecar)."""
    return _write(task, params, path, spec, compile=True)


def _write(task: Task, params: Any, path: Path, spec: ArtifactSpec, compile: bool) -> Report:
    embedded = {**spec.metadata, "file": spec.file}
    # parity_tolerance=None: the one check is `measured`, on spec.args (other sizes than the traced ones).
    export = to_torch_export(task.predict, params, **translation_args(task), path=str(path) if compile else None,
                             parity_tolerance=None, compile=compile,
                             extra_files={PACKAGE_METADATA: json.dumps(embedded)})
    report = measured(task, spec, export)
    spec.facts.update(dims=export.dims, control_flow=export.control_flow)
    if compile:
        spec.facts["target"] = export.target
    else:
        embedded.update(parity=report.as_dict(), **spec.facts)
        torch.export.save(export.program, str(path), extra_files={"model.json": json.dumps(embedded)})
    return report
