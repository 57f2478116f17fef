"""Export a checkpoint SOURCE to `.pt` (TorchScript), `.stablehlo` (jax.export) or `.safetensors`.

Every export is checked against JAX on fresh inputs whose symbolic dims (batch, atoms, seq) differ from the
tracing example; the errors go into the sidecar `model.json` (also embedded in the artifact), and an export
above the tolerance fails. The sidecar records provenance: source step, config, versions, signature.
"""

from __future__ import annotations

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
from trainkit.models import Task

FORMATS = {".pt": "pt", ".stablehlo": "stablehlo", ".safetensors": "safetensors"}
SUFFIX = {v: k for k, v in FORMATS.items()}
TRACE_DIMS = {"batch": 2, "atoms": 8, "seq": 8}
CHECK_DIMS = {"batch": 3, "atoms": 12, "seq": 12}


def format_of(out: str | Path) -> str:
    suffix = Path(out).suffix
    if suffix not in FORMATS:
        raise TrainkitError(f"cannot tell the export format of {out}: use a .pt (TorchScript), .stablehlo "
                            "(serialized jax.export) or .safetensors (weights) file name")
    return FORMATS[suffix]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def reference(task: Task, params: Any, args: tuple) -> tuple[np.ndarray, np.ndarray | None]:
    """JAX's outputs (first output) and, for potentials, forces = -dE/d(first input)."""
    out = jax.jit(task.predict)(params, *args)
    first = out[0] if isinstance(out, (tuple, list)) else out
    forces = None
    if task.has_forces:
        grad = jax.grad(lambda x: jnp.sum(task.predict(params, x, *args[1:])))(args[0])
        forces = np.asarray(-grad)
    return np.asarray(first), forces


def relative_error(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max |got-ref|, max |got-ref| / max(max |ref|, 1e-30)) in float64."""
    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref64.shape != got64.shape:
        raise TrainkitError(f"export parity: output shape {got64.shape} differs from JAX's {ref64.shape}")
    err = float(np.max(np.abs(got64 - ref64), initial=0.0))
    return err, err / max(float(np.max(np.abs(ref64), initial=0.0)), 1e-30)


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


def export_model(task: Task, params: Any, out: Path, provenance: Mapping[str, Any], *,
                 tolerance: float = 1e-5) -> dict[str, Any]:
    """Write one artifact for `task` with `params`; returns its sidecar entry. The format comes from the suffix."""
    fmt = format_of(out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = jax.tree.map(jnp.asarray, params)  # numpy leaves cannot be indexed by traced arrays
    check_args = tuple(np.asarray(a) for a in task.example_inputs(1, CHECK_DIMS))
    ref, ref_forces = reference(task, params, check_args)
    with_forces = task.has_forces and fmt != "safetensors"
    sidecar = {
        **provenance,
        "format": fmt,
        "versions": {p: _version(p) for p in ("trainkit", "jax", "flax", "torch")},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **signature(task, params, with_forces),
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if fmt == "safetensors":
            from trainkit.export.safetensors import write_safetensors

            parity = write_safetensors(params, tmp, sidecar)
        elif fmt == "stablehlo":
            parity = _stablehlo(task, params, tmp, check_args, ref, ref_forces)
        else:
            parity = _torchscript(task, params, tmp, check_args, ref, ref_forces, sidecar, tolerance)
        _check(parity, tolerance, fmt)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar["parity"] = parity
    sidecar["file"] = out.name
    sidecar["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    return sidecar


def _check(parity: Mapping[str, float], tolerance: float, fmt: str) -> None:
    worst = max(parity.get("max_rel", 0.0), parity.get("forces_max_rel", 0.0))
    if not worst <= tolerance:
        raise TrainkitError(
            f"{fmt} export does not match JAX: max relative error {worst:.3g} > tolerance {tolerance:g}; "
            "nothing was written. Pass --tolerance to accept a larger error explicitly"
        )


def _stablehlo(task: Task, params: Any, path: Path, args: tuple, ref, ref_forces) -> dict[str, float]:
    from trainkit.export.stablehlo import export_stablehlo, load_stablehlo

    export_stablehlo(lambda *a: task.predict(params, *a), task.inputs, path)
    exported = load_stablehlo(path)  # check what was written, not what is in memory
    out = exported.call(*args)
    got = out[0] if isinstance(out, (tuple, list)) else out
    parity = dict(zip(("max_abs", "max_rel"), relative_error(ref, np.asarray(got))))
    if ref_forces is not None:
        grad = jax.grad(lambda x: jnp.sum(exported.call(x, *args[1:])))(args[0])
        parity.update(zip(("forces_max_abs", "forces_max_rel"), relative_error(ref_forces, -np.asarray(grad))))
    return parity


def _torchscript(task: Task, params: Any, path: Path, args: tuple, ref, ref_forces, sidecar: dict,
                 tolerance: float) -> dict[str, float]:
    try:
        import torch

        from trainkit.export.torchscript import to_torchscript
    except ImportError:
        raise TrainkitError("exporting .pt needs PyTorch: pip install 'trainkit[torch]'") from None
    trace_args = task.example_inputs(0, TRACE_DIMS)
    axes = [{i: d for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in task.inputs]
    module = to_torchscript(
        task.predict, params, trace_args, dynamic_axes=axes, input_names=[s.name for s in task.inputs],
        output_names=list(task.outputs), with_forces=task.has_forces, parity_tolerance=max(tolerance, 1e-4),
    )
    tensors = [torch.from_numpy(np.array(a, copy=True)) for a in args]  # keeps 0-d inputs 0-d
    if task.has_forces:
        energy, forces = module(*tensors)
        parity = dict(zip(("max_abs", "max_rel"), relative_error(ref, energy.detach().numpy())))
        parity.update(zip(("forces_max_abs", "forces_max_rel"),
                          relative_error(ref_forces, forces.detach().numpy())))
    else:
        with torch.no_grad():
            out = module(*tensors)
        got = out[0] if isinstance(out, (tuple, list)) else out
        parity = dict(zip(("max_abs", "max_rel"), relative_error(ref, got.numpy())))
    _check(parity, tolerance, "pt")
    embedded = {**sidecar, "parity": parity, "file": Path(path).name.split(".tmp-")[0].lstrip(".")}
    torch.jit.save(module, str(path), _extra_files={"model.json": json.dumps(embedded)})
    return parity


def load_params_and_task(step_dir: Path) -> tuple[Task, Any, dict[str, Any]]:
    """The Task (from the step's own train_config.json) and its params as host arrays."""
    import ml_collections

    from trainkit.checkpointing import read_meta, read_state_arrays, read_step_config
    from trainkit.data import load_dataset
    from trainkit.models import build_task

    config = ml_collections.ConfigDict(read_step_config(step_dir))
    meta = read_meta(step_dir)
    task = build_task(config, load_dataset(config.data).info)
    return task, read_state_arrays(step_dir)["params"], {"config": config.to_dict(), "model": meta.get("model")}


def write_sidecar(path: Path, entry: Mapping[str, Any]) -> None:
    """Merge `entry` into the sidecar `model.json` beside the artifacts (one entry per format)."""
    existing = json.loads(path.read_text()) if path.exists() else {}
    same_source = existing.get("source") == entry.get("source")
    artifacts = existing.get("artifacts", {}) if same_source else {}
    artifacts[entry["format"]] = {k: entry[k] for k in ("file", "sha256", "parity", "inputs", "outputs")}
    common = {k: v for k, v in entry.items() if k not in ("file", "sha256", "parity", "format", "outputs")}
    path.write_text(json.dumps({**common, "artifacts": artifacts}, indent=2, default=str))


def export_checkpoint(source: str, out: str | Path, *, hf_token: str | None = None, tolerance: float = 1e-5,
                      overwrite: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """`python -m trainkit.export SOURCE -o OUT`: resolve, load, export, check, write the sidecar."""
    from trainkit.sources import resolve_source
    from trainkit.workdir import prepare_output

    out = Path(out)
    format_of(out)
    if out.exists() and not overwrite:
        raise TrainkitError(f"{out} already exists; pass --overwrite to replace it, or choose another -o")
    prepare_output(out)  # before the (slow) load: an unwritable -o fails at once
    resolved = resolve_source(source, hf_token=hf_token)
    task, params, info = load_params_and_task(resolved.step_dir)
    provenance = {"source": {"origin": resolved.origin, "step": resolved.step}, **info}
    entry = export_model(task, params, out, provenance, tolerance=tolerance)
    write_sidecar(out.with_suffix(".json"), entry)
    progress(f"exported step {resolved.step} of {resolved.origin} to {out} "
             f"(parity max_rel {max(entry['parity'].get('max_rel', 0), entry['parity'].get('forces_max_rel', 0)):.2g})")
    return entry


def export_final(workdir: epath.Path, step_dir: epath.Path, config, task: Task) -> None:
    """End of training: W/export/model.ckpt (the packed final step) beside each format in export.formats.
    For a gs:// workdir the step is copied here, exported into the local staging dir, then uploaded."""
    from trainkit.aliases import is_local
    from trainkit.checkpointing import read_state_arrays
    from trainkit.packing import pack
    from trainkit.sources import copy_step_dir, default_cache_dir
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
    for fmt in config.export.formats:
        out = export_dir / f"model{SUFFIX[fmt]}"
        entry = export_model(task, params, out, provenance, tolerance=config.export.tolerance)
        write_sidecar(export_dir / "model.json", entry)
        print(f"trainkit: exported {workdir / 'export' / out.name} (parity max_rel "
              f"{max(entry['parity'].get('max_rel', 0), entry['parity'].get('forces_max_rel', 0)):.2g})", flush=True)
    staged.close()
