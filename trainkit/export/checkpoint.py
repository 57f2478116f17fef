"""Export a checkpoint SOURCE to any format in `trainkit.export.formats.FORMATS` (the OUT suffix picks it).

Every export is checked against JAX once, on fresh inputs whose symbolic dims (batch, atoms, seq) differ from the
tracing example; the errors go into the sidecar `model.json` (also embedded in the artifact), and an export
above the tolerance fails. The sidecar records provenance: source step, config, versions, signature.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from trainkit.errors import TrainkitError
from trainkit.export.formats import ARTIFACT_FACTS, FORMATS, ArtifactSpec, Format, Report, format_named, format_of
from trainkit.export.parity import CHECK_DIMS, reference
from trainkit.models import Task
from trainkit.paths import absolute_path


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def signature(task: Task, params: Any, with_forces: bool) -> dict[str, list[dict[str, Any]]]:
    """The sidecar's input/output signature; symbolic dims (batch, atoms, seq) are null."""
    from trainkit.export.stablehlo import symbolic_specs

    def shape(dims) -> list[int | None]:
        return [d if isinstance(d, int) else None for d in dims]

    specs = symbolic_specs(task.inputs)
    out = jax.eval_shape(lambda *a: task.predict(params, *a), *specs)
    outs = out if isinstance(out, (tuple, list)) else [out]
    outputs = [{"name": n, "shape": shape(o.shape), "dtype": str(o.dtype)} for n, o in zip(task.outputs, outs)]
    if with_forces:
        outputs.append({"name": "forces", "shape": shape(task.inputs[0].shape), "dtype": task.inputs[0].dtype})
    return {"inputs": [{"name": s.name, "shape": shape(s.shape), "dtype": s.dtype} for s in task.inputs],
            "outputs": outputs}


TOLERANCES = {"float32": 1e-5, "float64": 1e-10}  # default parity tolerance (max_rel) by export dtype
DTYPES = tuple(TOLERANCES)


def export_model(task: Task, params: Any, out: Path, provenance: Mapping[str, Any], *,
                 tolerance: float | None = None, dtype: str = "float32", fmt: Format | None = None) -> dict[str, Any]:
    """Write one artifact for `task` with `params`; returns its sidecar entry. The format comes from the suffix
    unless `fmt` is given. `dtype`: the float dtype of the artifact's inputs, parameters and computation
    (float64: traced and checked under `jax.enable_x64`); `tolerance` defaults to TOLERANCES[dtype]."""
    if dtype not in TOLERANCES:
        raise TrainkitError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    with jax.enable_x64(dtype == "float64"):
        return _export_model(*in_dtype(task, params, dtype), Path(out), provenance, fmt or format_of(out),
                             TOLERANCES[dtype] if tolerance is None else tolerance, dtype)


def in_dtype(task: Task, params: Any, dtype: str) -> tuple[Task, Any]:
    """The task with float inputs (and example inputs) in `dtype`, and the float params cast to it."""
    def cast(x: Any) -> Any:
        x = np.asarray(x)
        return x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x

    inputs = tuple(dataclasses.replace(s, dtype=dtype) if s.dtype.startswith("float") else s for s in task.inputs)
    example = task.example_inputs
    task = dataclasses.replace(task, inputs=inputs, example_inputs=lambda seed, dims: tuple(
        cast(a) for a in example(seed, dims)))
    return task, jax.tree.map(lambda p: jnp.asarray(cast(p)), params)  # jnp: traced arrays index them


def _export_model(task: Task, params: Any, out: Path, provenance: Mapping[str, Any], fmt: Format,
                  tolerance: float, dtype: str) -> dict[str, Any]:
    fmt.require()
    out.parent.mkdir(parents=True, exist_ok=True)
    check_args = tuple(np.asarray(a) for a in task.example_inputs(1, CHECK_DIMS))
    ref = reference(task, params, check_args)
    sidecar = {
        **provenance,
        "format": fmt.name,
        "versions": {p: _version(p) for p in ("trainkit", "jax", "flax", "torch")},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **signature(task, params, task.has_forces and fmt.runs_model),
        "dtype": dtype,
        **({"cutoff": task.cutoff} if task.cutoff is not None else {}),
    }
    spec = ArtifactSpec(file=out.name, metadata=sidecar, args=check_args, ref=ref)
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")  # keeps the suffix (AOTInductor wants .pt2)
    try:
        report = fmt.write(task, params, tmp, spec)
        _check(report, tolerance, fmt)  # the one gate: a failing artifact never reaches `out`
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {**sidecar, **spec.facts, "parity": report.as_dict(), "file": out.name,
            "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}


def _check(report: Report, tolerance: float, fmt: Format) -> None:
    if not report.worst <= tolerance:
        raise TrainkitError(
            f"{fmt.name} export does not match JAX: max relative error {report.worst:.3g} > tolerance {tolerance:g}; "
            "nothing was written. Pass --tolerance to accept a larger error explicitly"
        )


def load_params_and_task(step_dir: Path) -> tuple[Task, Any, dict[str, Any]]:
    """The Task (from the step's own train_config.json) and its params as host arrays."""
    import ml_collections

    from trainkit.checkpoints.manager import read_state_arrays, read_step_info
    from trainkit.data import load_dataset
    from trainkit.models import build_task

    info = read_step_info(step_dir)
    config, meta = ml_collections.ConfigDict(info.config), info.meta
    task = build_task(config, load_dataset(config.data).info)
    return task, read_state_arrays(step_dir)["params"], {"config": config.to_dict(), "model": meta.model}


def write_sidecar(path: Path, entry: Mapping[str, Any]) -> None:
    """Merge `entry` into the sidecar `model.json` beside the artifacts (one entry per format)."""
    existing = json.loads(path.read_text()) if path.exists() else {}
    same_source = existing.get("source") == entry.get("source")
    artifacts = existing.get("artifacts", {}) if same_source else {}
    own = ("file", "sha256", "parity", "inputs", "outputs", "dtype", *ARTIFACT_FACTS)
    artifacts[entry["format"]] = {k: entry[k] for k in own if k in entry}
    common = {k: v for k, v in entry.items() if k == "inputs" or k not in (*own, "format")}
    path.write_text(json.dumps({**common, "artifacts": artifacts}, indent=2, default=str))


def export_checkpoint(source: str, out: str | Path, *, hf_token: str | None = None, tolerance: float | None = None,
                      overwrite: bool = False, dtype: str = "float32", format: str | None = None,
                      progress: Callable[[str], None] = print) -> dict[str, Any]:
    """`python -m trainkit.export SOURCE -o OUT`: resolve, load, export, check, write the sidecar. `format` picks
    a format by name where the suffix is ambiguous (`metatomic` is a `.pt` too); else the suffix decides."""
    from trainkit.checkpoints.sources import resolve_source
    from trainkit.workdir import prepare_output

    out = Path(absolute_path(out))
    fmt = format_named(format, out) if format else format_of(out)
    if dtype not in TOLERANCES:
        raise TrainkitError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if out.exists() and not overwrite:
        raise TrainkitError(f"{out} already exists; pass --overwrite to replace it, or choose another -o")
    prepare_output(out)  # before the (slow) load: an unwritable -o fails at once
    resolved = resolve_source(source, hf_token=hf_token)
    task, params, info = load_params_and_task(resolved.step_dir)
    provenance = {"source": {"origin": resolved.origin, "step": resolved.step}, **info}
    entry = export_model(task, params, out, provenance, tolerance=tolerance, dtype=dtype, fmt=fmt)
    write_sidecar(out.with_suffix(".json"), entry)
    worst = Report(**entry["parity"]).worst
    progress(f"exported step {resolved.step} of {resolved.origin} to {out} (parity max_rel {worst:.2g})")
    return entry


def export_final(workdir: epath.Path, step_dir: epath.Path, config, task: Task) -> None:
    """End of training: W/export/model.ckpt (the packed final step) beside each format in export.formats.
    For a gs:// workdir the step is copied here, exported into the local staging dir, then uploaded."""
    from trainkit.paths import is_local
    from trainkit.checkpoints.manager import read_state_arrays
    from trainkit.checkpoints.packing import pack
    from trainkit.checkpoints.sources import copy_step_dir
    from trainkit.paths import default_cache_dir
    from trainkit.workdir import Staged

    workdir = epath.Path(workdir)
    staged = Staged(workdir, ("export",), strict=True)
    export_dir = staged.local / "export"
    export_dir.mkdir(exist_ok=True)
    local_step = Path(step_dir) if is_local(step_dir) else copy_step_dir(step_dir, default_cache_dir())
    pack(local_step, export_dir / "model.ckpt")
    step = int(local_step.name)
    params = read_state_arrays(local_step)["params"]
    origin = str(workdir / "export" / "model.ckpt")  # where it ends up (for gs://, after the upload)
    provenance = {"source": {"origin": origin, "step": step}, "config": config.to_dict(), "model": task.name}
    for name in config.export.formats:
        out = export_dir / FORMATS[name].file_name
        entry = export_model(task, params, out, provenance, tolerance=config.export.tolerance, fmt=FORMATS[name])
        write_sidecar(export_dir / "model.json", entry)
        worst = Report(**entry["parity"]).worst
        print(f"trainkit: exported {workdir / 'export' / out.name} (parity max_rel {worst:.2g})", flush=True)
    staged.close()
