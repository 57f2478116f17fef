"""torch.export `.pt2` programs and AOTInductor packages (issue #17), checked the way users meet them.

- Our three configs: trained for real, exported by `python -m trainkit.export` (the potential's package by the
  command a user types, relative paths, from the run's parent directory), then loaded in a process that never
  imports JAX or trainkit, at two sizes the export never saw, three calls each: outputs (and forces) equal
  JAX's, bit-identical from call to call.
- The third-party corpus (tests/corpus/): every float32 function as a `.pt2`, in the torch-only worker of
  tests/test_corpus.py, outputs and torch-autograd input gradients against JAX at two sizes; a pair potential
  with forces, an attention block and a scan also as AOTInductor packages.
- Control flow as higher-order ops answers for every trip count and branch, not the example's; gradients of a
  `.pt2` are JAX's where torch autograd would differ; a package refuses a machine it was not compiled for.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import corpus
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_corpus import Worker, check_artifact
from test_export import reference_outputs, trained_run

from conftest import ROOT, assert_user_error, cli_env, run_cli
from trainkit.errors import TrainkitError
from trainkit.export import to_torch_export

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning",
                                        "ignore::FutureWarning")
SIZES = ({"batch": 5, "atoms": 16, "seq": 10}, {"batch": 1, "atoms": 5, "seq": 3})  # neither traced (2, 8, 8)
AOTI_CASES = ("jaxmd_lj_neighbor_list-f32", "flax_causal_self_attention-f32", "eqx_gru_scan-f32",
              "flax_bidirectional_gru-f32", "jnp_while_loop-f32")  # + a reverse scan, a data-dependent loop

RUNNER = """
import json, sys, numpy as np, torch
path, inputs, out = sys.argv[1:4]
if path.endswith(".aoti.pt2"):
    run = torch._inductor.aoti_load_package(path)
    meta = json.loads(run.get_metadata()["trainkit.model_json"])
else:
    extra = {"model.json": ""}
    run = torch.export.load(path, extra_files=extra).module()
    meta = json.loads(extra["model.json"])
results = {}
for s, name in enumerate(inputs.split(",")):
    data = np.load(name)
    args = [torch.from_numpy(data[f"arr_{i}"]) for i in range(len(data.files))]
    for call in range(3):
        outs = run(*args)
        outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
        results.update({f"s{s}_c{call}_o{k}": o.detach().numpy() for k, o in enumerate(outs)})
np.savez(out, **results)
assert not {"jax", "trainkit", "flax"} & set(sys.modules), "imported JAX or trainkit"
print(meta["source"]["step"])
"""


def run_torch_only(path: Path, tmp_path: Path, workdir: Path) -> list[list[list[np.ndarray]]]:
    """`path` run in a fresh torch-only process at SIZES (3 calls each); returns JAX's outputs and the
    artifact's, per size, and checks that every call gave the same bits."""
    inputs, refs = [], []
    for s, dims in enumerate(SIZES):
        args, ref, _ = reference_outputs(workdir, dims)
        np.savez(tmp_path / f"in{s}.npz", *args)
        inputs.append(str(tmp_path / f"in{s}.npz"))
        refs.append(ref)
    env = {k: v for k, v in cli_env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(path), ",".join(inputs), str(tmp_path / "out.npz")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "6"  # the embedded sidecar names the checkpoint's step
    got = np.load(tmp_path / "out.npz")
    for s, ref in enumerate(refs):
        for k, value in enumerate(ref):
            first = got[f"s{s}_c0_o{k}"]
            assert all(np.array_equal(first, got[f"s{s}_c{c}_o{k}"]) for c in (1, 2)), (path.name, s, k)
            assert first.shape == value.shape
            assert np.max(np.abs(first - value)) <= 1e-5 * max(np.max(np.abs(value)), 0.1), (path.name, s, k)
    return refs


@pytest.mark.slow
@pytest.mark.parametrize("name", ["default", "lm_chars", "potential"])
def test_config_pt2_and_aoti_package_run_without_jax_at_other_sizes(name, tmp_path_factory, tmp_path):
    """The `.pt2` by the Python API, the package by the command users type (relative paths); for the potential,
    the package is then loaded where this process may not use the ISA it was compiled for
    (ATEN_CPU_CAPABILITY=default, torch's own switch): one line naming the fix."""
    from trainkit.export.checkpoint import export_checkpoint

    workdir = trained_run(name, tmp_path_factory)
    entry = export_checkpoint(str(workdir), tmp_path / "model.pt2", progress=lambda _: None)
    assert entry["parity"]["max_rel"] <= 1e-5
    proc = subprocess.run([sys.executable, "-m", "trainkit.export", os.path.relpath(workdir, tmp_path), "-o",
                           "model.aoti.pt2"], cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parity max_rel" in proc.stdout
    for file in ("model.pt2", "model.aoti.pt2"):
        run_torch_only(tmp_path / file, tmp_path, workdir)
    sidecar = json.loads((tmp_path / "model.aoti.json").read_text())["artifacts"]["aoti"]
    assert sidecar["file"] == "model.aoti.pt2" and sidecar["parity"]["max_rel"] <= 1e-5
    assert sidecar["target"]["AOTI_MACHINE"] == platform.machine() and sidecar["target"]["AOTI_CPU_ISA"]
    names = {"default": {"batch"}, "lm_chars": {"batch", "seq"}, "potential": {"atoms", "edges"}}[name]
    assert set(sidecar["dims"]) == names  # the sidecar's dynamic dims are the program's torch.export.Dims
    assert len(torch.export.load(str(tmp_path / "model.pt2")).range_constraints) >= len(names)
    if name == "potential":
        assert_refused_elsewhere(tmp_path / "model.aoti.pt2", sidecar["target"]["AOTI_CPU_ISA"])


def assert_refused_elsewhere(package: Path, isa: str) -> None:
    code = f"""
import sys
from trainkit.export.runtime import load_package, PackageTargetError
try:
    load_package({str(package)!r})
except PackageTargetError as e:
    print(e)
assert "jax" not in sys.modules, "the loader imported JAX"
"""
    env = {**cli_env(), "ATEN_CPU_CAPABILITY": "default"}
    refused = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 0, refused.stderr[-2000:]
    assert refused.stdout.strip() == (
        f"{package.name} was compiled for {isa} CPUs and this process can run no vector ISA "
        "(ATEN_CPU_CAPABILITY=default); compile it again on this machine "
        f"(python -m trainkit.export SOURCE -o {package.name})")
    again = subprocess.run([sys.executable, "-c", code.replace("print(e)", "raise")], cwd=ROOT, env=cli_env(),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == "", again.stderr[-2000:]  # loads where it was built


def test_a_package_from_a_cpu_with_other_extensions_is_refused():
    """AOTInductor compiles with -march=native: a package records its CPU's instruction-set flags, and a CPU
    without one of them refuses it (a flag no CPU of this architecture has stands in for the other CPU)."""
    from trainkit.export.runtime import CPU_FLAGS, PackageTargetError, check_target, cpu_flags

    here = cpu_flags()
    if not here:
        pytest.skip("no /proc/cpuinfo flags on this platform")
    foreign = "sve2" if platform.machine() in ("x86_64", "AMD64") else "avx512f"
    metadata = {"AOTI_MACHINE": platform.machine(), "AOTI_DEVICE_KEY": "cpu", "AOTI_CPU_ISA": "",
                CPU_FLAGS: " ".join(sorted(here | {foreign}))}
    check_target({**metadata, CPU_FLAGS: " ".join(sorted(here))}, "m.aoti.pt2")  # its own CPU: fine
    with pytest.raises(PackageTargetError, match=f"compiled for a CPU with {foreign} and this one has not"):
        check_target(metadata, "m.aoti.pt2")


def test_export_names_pick_pt2_and_the_package():
    from trainkit.export.formats import format_named, format_of

    assert format_of("model.pt2").name == "pt2"
    assert format_of("runs/x/model.aoti.pt2").name == "aoti"
    assert format_named("aoti", "model.aoti.pt2").name == "aoti"
    with pytest.raises(TrainkitError, match=r"name the output model\.aoti\.pt2$"):
        format_named("aoti", "model.pt2")


# -- the corpus -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("export_worker"))
    yield w
    w.close()


def _export(case_id: str, path: Path, compile: bool):
    with jax.enable_x64(case_id.endswith("-f64")):
        case = corpus.build(case_id)
        export = to_torch_export(case.fn, case.params, case.args1, str(path), dynamic_axes=case.dynamic_axes,
                                 with_forces=case.with_forces, dim_constraints=case.dim_constraints,
                                 compile=compile)
    return case, export


@pytest.mark.slow
@pytest.mark.parametrize("case_id", [c for c in corpus.case_ids() if c.endswith("-f32")])
def test_corpus_pt2(case_id, worker, tmp_path):
    case, _ = _export(case_id, tmp_path / "m.pt2", compile=False)
    check_artifact(case, tmp_path / "m.pt2", worker, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", AOTI_CASES)
def test_corpus_aoti_package(case_id, worker, tmp_path):
    case, export = _export(case_id, tmp_path / "m.aoti.pt2", compile=True)
    check_artifact(case, tmp_path / "m.aoti.pt2", worker, tmp_path, autograd=False)  # a package has no autograd
    assert export.target["AOTI_DEVICE_KEY"] == "cpu"
    wrong = [torch.from_numpy(np.array(a)) for a in case.args1]
    wrong[0] = torch.cat([wrong[0], wrong[0][..., :1]], -1)  # one more along a static axis
    with pytest.raises(RuntimeError, match="size|shape|dim"):  # the package checks (load_package turns it on)
        export(*wrong)
    if case_id.startswith("eqx_gru_scan"):
        assert export.control_flow == ["torch._higher_order_ops.scan"]


# -- control flow and gradients ------------------------------------------------------------------------------

def _loop_and_branch(p, x):
    """A data-dependent while (halve until small), a cond on the data, and a scan over the dynamic axis."""
    def body(c):
        i, y = c
        return i + 1, y * 0.5

    steps, y = jax.lax.while_loop(lambda c: jnp.max(jnp.abs(c[1])) > p, body, (0, x))
    z = jax.lax.cond(jnp.sum(x) > 0, lambda v: jnp.sin(v) * 2.0, lambda v: jnp.cos(v) - 1.0, y)
    total, ys = jax.lax.scan(lambda c, row: (c + row, c * row), jnp.zeros(x.shape[1], x.dtype), z)
    return steps, total, ys


def test_control_flow_is_higher_order_ops_right_for_every_trip_count_and_branch(tmp_path):
    x = np.linspace(-3, 2, 12, dtype=np.float32).reshape(4, 3)
    export = to_torch_export(_loop_and_branch, np.float32(0.3), (x,), str(tmp_path / "cf.pt2"),
                             dynamic_axes=[{0: "rows"}])
    assert export.control_flow == ["torch._higher_order_ops.scan", "torch._higher_order_ops.while_loop",
                                   "torch.cond"]
    program = torch.export.load(str(tmp_path / "cf.pt2")).module()
    trips = set()
    for scale, rows in ((1.0, 4), (40.0, 7), (-0.01, 2), (300.0, 1)):  # other trip counts, branches, lengths
        xs = (np.linspace(-1, 3, rows * 3, dtype=np.float32).reshape(rows, 3) * scale)
        ref = jax.jit(_loop_and_branch)(np.float32(0.3), xs)
        for _ in range(2):
            got = program(torch.from_numpy(xs))
            for g, r in zip(got, ref):
                np.testing.assert_allclose(g.numpy(), np.asarray(r), rtol=1e-5, atol=1e-6)
        trips.add(int(ref[0]))
    assert len(trips) == 4  # the while loop ran a different number of times for each input


def _kinks(p, x):
    """Where torch autograd and JAX disagree: |x| at 0, clip at its bounds, a masked-off NaN, a custom_jvp."""
    safe = jnp.where(x > 0, jnp.sqrt(jnp.where(x > 0, x, 1.0)), 0.0)
    nan_masked = jnp.where(x > -10, x, jnp.log(x))  # log of negatives, selected away
    return (jnp.abs(x) + jnp.clip(x, -1.0, 1.0) + safe + nan_masked + jax.nn.relu(x) * p).sum()


def test_pt2_gradients_are_jaxs_where_torch_autograd_differs(tmp_path):
    x = np.array([0.0, 1.0, -1.0, 0.5, -2.0, 3.0], np.float32)
    export = to_torch_export(_kinks, np.float32(2.0), (x,), str(tmp_path / "k.pt2"), dynamic_axes=[{0: "n"}])
    program = torch.export.load(str(tmp_path / "k.pt2")).module()
    for xs in (x, np.array([0.0, -1.0, 1.0], np.float32)):
        ref = np.asarray(jax.grad(_kinks, argnums=1)(np.float32(2.0), xs))
        for _ in range(3):
            t = torch.from_numpy(xs.copy()).requires_grad_(True)
            (grad,) = torch.autograd.grad(program(t), [t])
            np.testing.assert_allclose(grad.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert export.parity["max_rel"] <= 1e-6


def test_dim_constraints_bound_the_program_and_bad_sizes_fail_at_call(tmp_path):
    def f(p, x):
        return jnp.tanh(x @ p)

    p = np.eye(3, dtype=np.float32)
    x = np.ones((2, 3), np.float32)
    export = to_torch_export(f, p, (x,), dynamic_axes=[{0: "seq"}], dim_constraints=["seq <= 16"])
    assert export.dims == {"seq": {"min": 1, "max": 16}}
    assert export(torch.ones(16, 3)).shape == (16, 3)
    with pytest.raises(AssertionError, match=r"size\(\)\[0\] <= 16"):  # the program's own guard on the Dim
        export(torch.ones(17, 3))
    with pytest.raises(TrainkitError, match="AOTInductor package is a .pt2 file"):
        to_torch_export(f, p, (x,), str(tmp_path / "model.so"), compile=True)


@pytest.mark.slow
def test_cli_error_for_a_package_without_a_compiler_is_one_line(tmp_path_factory, tmp_path):
    """No C++ compiler on PATH: AOTInductor cannot build a package; the export says so in one line and
    writes nothing."""
    workdir = trained_run("default", tmp_path_factory)
    env = {**cli_env(), "PATH": "/nonexistent", "CXX": "/nonexistent/c++"}
    proc = run_cli(str(workdir), "-o", str(tmp_path / "m.aoti.pt2"), env=env, module="trainkit.export")
    assert_user_error(proc, "no C++ compiler", "install g++ or clang++")
    assert not list(tmp_path.iterdir())
