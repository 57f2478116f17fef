"""Export as users meet it: every model config to all three formats, each artifact loaded the way a
downstream user would (fresh processes; the .pt in one that never imported JAX), on inputs of other sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_user_error, cli_env, run_cli, train, tree_hash

CONFIGS = {
    "default": ("configs/default.py", ()),
    "lm_chars": ("configs/lm_chars.py:tiny", ()),
    "potential": ("configs/potential.py:tiny", ()),
}
FORMATS = "--config.export.formats=('pt','stablehlo','safetensors')"
SHORT = ("--config.num_steps=6", "--config.log_every=3", "--config.eval_every=6", "--config.checkpoint.every=6")
NEW_DIMS = {"batch": 5, "atoms": 16, "seq": 10}  # differ from the tracing example (2, 8, 8) and the check (3, 12, 12)


_RUNS: dict[str, Path] = {}


def trained_run(name: str, tmp_path_factory) -> Path:
    """A short real training run of config `name` whose final export writes all three formats (cached)."""
    if name not in _RUNS:
        workdir = tmp_path_factory.mktemp(name)
        config, extra = CONFIGS[name]
        train(workdir, *SHORT, FORMATS, *extra, config=config)
        _RUNS[name] = workdir
    return _RUNS[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory) -> tuple[str, Path]:
    return request.param, trained_run(request.param, tmp_path_factory)


def reference_outputs(workdir: Path, dims: dict[str, int]) -> tuple[list[np.ndarray], list[np.ndarray], bool]:
    """New inputs, JAX's outputs in the artifacts' order (`parity.output_names`: forces last for a task that
    differentiates its first output) for the final checkpoint, and whether the forces are such a derivative."""
    import jax.numpy as jnp

    from trainkit.export.checkpoint import load_params_and_task
    from trainkit.export.parity import reference

    task, params, _ = load_params_and_task(workdir / "checkpoints" / "000006")
    params = __import__("jax").tree.map(jnp.asarray, params)
    args = [np.asarray(a) for a in task.example_inputs(7, dims)]
    return args, list(reference(task, params, tuple(args)).values()), task.has_forces


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(**env), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_export_dir_holds_final_checkpoint_beside_its_exports(exported):
    name, workdir = exported
    export = workdir / "export"
    assert {p.name for p in export.iterdir()} >= {"model.ckpt", "model.pt", "model.stablehlo",
                                                  "model.safetensors", "model.json"}
    sidecar = json.loads((export / "model.json").read_text())
    assert sidecar["source"]["step"] == 6
    assert set(sidecar["artifacts"]) == {"pt", "stablehlo", "safetensors"}
    for fmt, art in sidecar["artifacts"].items():
        assert art["parity"]["max_rel"] <= 1e-5, (fmt, art["parity"])
    inputs = sidecar["inputs"]
    assert inputs[0]["shape"][0] is None  # symbolic batch
    assert sidecar["versions"]["jax"] and sidecar["config"]["num_steps"] == 6


def test_torchscript_runs_without_jax_on_other_sizes(exported, tmp_path):
    name, workdir = exported
    args, ref, _ = reference_outputs(workdir, NEW_DIMS)
    np.savez(tmp_path / "inputs.npz", *args)
    code = f"""
import json, sys, numpy as np, torch
extra = {{"model.json": ""}}
m = torch.jit.load({str(workdir / 'export' / 'model.pt')!r}, _extra_files=extra)
meta = json.loads(extra["model.json"])
data = np.load({str(tmp_path / 'inputs.npz')!r})
args = [torch.from_numpy(data[f"arr_{{i}}"]) for i in range(len(data.files))]
out = m(*args)
out = out if isinstance(out, tuple) else (out,)
np.savez({str(tmp_path / 'out.npz')!r}, *[o.detach().numpy() for o in out])
assert "jax" not in sys.modules and "trainkit" not in sys.modules and "flax" not in sys.modules, "imported JAX"
print(meta["source"]["step"])
"""
    proc = run_python(code)
    assert proc.stdout.strip() == "6"
    got = np.load(tmp_path / "out.npz")
    assert len(got.files) == len(ref)
    for k, value in enumerate(ref):
        assert np.max(np.abs(got[f"arr_{k}"] - value)) <= 1e-5 * max(np.max(np.abs(value)), 0.1), (name, k)


def test_stablehlo_deserializes_with_gradients(exported, tmp_path):
    name, workdir = exported
    args, ref, has_forces = reference_outputs(workdir, NEW_DIMS)
    np.savez(tmp_path / "inputs.npz", *args)
    code = f"""
import sys, numpy as np, jax, jax.numpy as jnp
exp = jax.export.deserialize(bytearray(open({str(workdir / 'export' / 'model.stablehlo')!r}, "rb").read()))
data = np.load({str(tmp_path / 'inputs.npz')!r})
args = [data[f"arr_{{i}}"] for i in range(len(data.files))]
out = exp.call(*args)
res = [np.asarray(o) for o in (out if isinstance(out, (tuple, list)) else [out])]
if {has_forces}:
    res.append(-np.asarray(jax.grad(lambda x: jnp.sum(exp.call(x, *args[1:])))(args[0])))
np.savez({str(tmp_path / 'out.npz')!r}, *res)
assert "trainkit" not in sys.modules
"""
    run_python(code)
    got = np.load(tmp_path / "out.npz")
    assert len(got.files) == len(ref)
    for k, value in enumerate(ref):
        np.testing.assert_allclose(got[f"arr_{k}"], value, rtol=1e-4, atol=1e-5 * max(np.max(np.abs(value)), 0.1))


@pytest.mark.slow
def test_safetensors_of_8_device_checkpoint_is_consolidated(tmp_path):
    """Saved with params sharded over fsdp=8: the file holds full arrays equal to the restored params."""
    import jax

    from trainkit.checkpoints.manager import read_state_arrays
    from trainkit.export.safetensors import flat_names

    train(tmp_path, *SHORT, "--config.mesh.data=1", "--config.mesh.fsdp=8", devices=8)
    proc = run_cli(str(tmp_path / "checkpoints" / "final"), "-o", str(tmp_path / "w.safetensors"),
                   module="trainkit.export")
    assert proc.returncode == 0, proc.stderr
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "w.safetensors"))
    params = flat_names(read_state_arrays(tmp_path / "checkpoints" / "000006")["params"])
    assert tensors.keys() == params.keys() and "params.Dense_0.kernel" in tensors
    for k, v in params.items():
        assert tensors[k].shape == v.shape and np.array_equal(tensors[k], v), k
    assert tensors["params.Dense_0.kernel"].shape == (1024, 128)
    del jax


@pytest.mark.slow
def test_ase_md_with_only_the_pt(tmp_path):
    workdir = tmp_path / "pot"
    train(workdir, "--config.num_steps=40", "--config.log_every=20", "--config.eval_every=40", FORMATS,
          config="configs/potential.py:tiny")
    code = f"""
import sys, json
sys.path.insert(0, "examples")
from md_with_exported_model import run_md
r = run_md({str(workdir / 'export' / 'model.pt')!r}, steps=300)
assert "jax" not in sys.modules, "the MD example imported JAX"
print(json.dumps(r))
"""
    report = json.loads(run_python(code).stdout.strip().splitlines()[-1])
    assert report["steps"] == 300
    assert report["max_drift_eV_per_atom"] < 5e-3, report


# -- bad input --------------------------------------------------------------------------------------------

def test_export_errors_are_one_line(tmp_path_factory, tmp_path):
    workdir = trained_run("default", tmp_path_factory)
    before = tree_hash(workdir)
    assert_user_error(run_cli(str(workdir), "-o", str(tmp_path / "m.onnx"), module="trainkit.export"), ".onnx")
    assert_user_error(run_cli(str(tmp_path / "nope"), "-o", str(tmp_path / "m.pt"), module="trainkit.export"),
                      "does not exist")
    existing = tmp_path / "exists.pt"
    existing.write_text("keep me")
    assert_user_error(run_cli(str(workdir), "-o", str(existing), module="trainkit.export"), "--overwrite")
    assert existing.read_text() == "keep me"
    assert tree_hash(workdir) == before


def test_formats_table_names_every_format_and_reading_it_imports_no_jax_or_torch():
    """`FORMATS` is the one list: config validation and the suffix lookup read it, without importing JAX or torch."""
    code = """
import sys
from trainkit.config import base_config, validate
from trainkit.export.formats import FORMATS, format_of
config = base_config()
config.export.formats = tuple(FORMATS)
validate(config)
# the suffix picks the format, except where two share one (.pt): there the first is the default, --format the other
assert all(format_of("model" + f.suffix) is next(g for g in FORMATS.values() if g.suffix == f.suffix)
           for f in FORMATS.values())
assert format_of("model.pt").name == "pt"
assert not {"jax", "torch"} & set(sys.modules), "reading the formats table imported JAX or torch"
print(" ".join(FORMATS))
"""
    assert run_python(code).stdout.split() == ["pt", "stablehlo", "safetensors", "metatomic", "pt2", "aoti"]


def test_a_nan_anywhere_fails_the_parity_gate():
    """A NaN output or NaN force is never within tolerance (max() alone would drop a NaN second argument)."""
    import math

    from trainkit.export.formats import Report

    assert Report(max_abs=0.0, max_rel=1e-7, forces_max_abs=math.nan, forces_max_rel=math.nan).worst == math.inf
    assert Report(max_abs=math.nan, max_rel=math.nan, forces_max_abs=0.0, forces_max_rel=1e-7).worst == math.inf
    assert Report(max_abs=1e-6, max_rel=2e-7, forces_max_abs=1e-6, forces_max_rel=3e-7).worst == 3e-7
