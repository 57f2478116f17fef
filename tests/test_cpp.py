"""The exported potential loads in C++ with the libtorch that ships in the torch wheel: same energy and forces,
on every call (libtorch's default executor optimizes the graph after the first calls)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, cli_env, train


@pytest.fixture(scope="module")
def run_potential(tmp_path_factory) -> Path:
    return compile_example(tmp_path_factory.mktemp("cpp"))


def compile_example(build: Path, name: str = "run_potential") -> Path:
    """Build examples/cpp/NAME.cpp with g++ against the torch wheel's libtorch; the executable's path."""
    proc, exe = start_example_build(build, name)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ could not build {name}:\n{err[-5000:]}")
    return exe


def start_example_build(build: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """Start g++ on examples/cpp/NAME.cpp in the background (to overlap with a model's export): the process and
    the executable it writes. libtorch_cpu holds the AOTInductor package loader too: no extra libraries."""
    import torch
    from torch.utils import cpp_extension

    exe = build / name
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdir = cpp_extension.library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = ["g++", "-std=c++17", "-O1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
           str(ROOT / "examples" / "cpp" / f"{name}.cpp"), "-o", str(exe),
           f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-ltorch", "-ltorch_cpu", "-lc10"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True), exe


@pytest.mark.slow
def test_cpp_libtorch_matches_python(tmp_path, run_potential):
    import torch

    train(tmp_path / "pot", "--config.num_steps=10", "--config.log_every=5", "--config.eval_every=10",
          "--config.export.formats=('pt',)", config="configs/potential_dense.py:tiny")  # the example's 3 batched inputs
    model = tmp_path / "pot" / "export" / "model.pt"
    exe = run_potential

    rng = np.random.default_rng(0)
    n = 20
    cell = np.diag([7.3, 7.2, 7.4]).astype(np.float32)
    positions = (rng.uniform(0, 1, (n, 3)) @ cell).astype(np.float32)
    numbers = rng.choice([28, 29], n).astype(np.int32)
    (tmp_path / "s.bin").write_bytes(positions.tobytes() + numbers.tobytes() + cell.tobytes())
    out = subprocess.run([str(exe), str(model), str(tmp_path / "s.bin"), str(n)], check=True,
                         capture_output=True, text=True, timeout=120).stdout.split("\n")
    energy_cpp = float(out[0])
    forces_cpp = np.array([[float(v) for v in line.split()] for line in out[1:1 + n]])

    module = torch.jit.load(str(model))
    energy, forces = module(torch.from_numpy(positions[None]), torch.from_numpy(numbers[None]),
                            torch.from_numpy(cell[None]))
    assert energy_cpp == pytest.approx(float(energy[0]), rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(forces_cpp, forces[0].detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cpp_masked_pair_potential_gives_jax_forces_on_every_call(tmp_path, run_potential):
    """jax-md's Lennard-Jones (masked self-pairs, a safe sqrt, nan_to_num) exported with forces: libtorch's defaults,
    20 calls, each equal to the first and to JAX's forces (torch autograd of the translated forward graph went NaN
    from the 2nd call; the module now evaluates JAX's own derivative)."""
    import jax
    import jax.numpy as jnp
    space = pytest.importorskip("jax_md.space")
    energy = pytest.importorskip("jax_md.energy")

    from trainkit.export import to_torchscript

    def lj(params, positions, numbers, cell):
        displacement, _ = space.periodic(jnp.diagonal(cell[0]))
        return energy.lennard_jones_pair(displacement, sigma=params["sigma"], epsilon=1.0, r_cutoff=2.5)(
            positions[0])[None]

    rng = np.random.default_rng(1)
    n, side = 24, 5.0
    cell = np.diag([side] * 3).astype(np.float32)[None]
    positions = rng.uniform(0, side, (1, n, 3)).astype(np.float32)
    numbers = np.full((1, n), 18, np.int32)
    params = {"sigma": np.float32(1.0)}
    model = tmp_path / "lj.pt"
    to_torchscript(lj, params, (positions[:, :16], numbers[:, :16], cell), str(model),
                   dynamic_axes=[{1: "atoms"}, {1: "atoms"}, None], with_forces=True)
    (tmp_path / "s.bin").write_bytes(positions.tobytes() + numbers.tobytes() + cell.tobytes())
    out = subprocess.run([str(run_potential), str(model), str(tmp_path / "s.bin"), str(n), "20"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    forces_cpp = np.array([[float(v) for v in line.split()] for line in lines[1:1 + n]])
    ref = -jax.grad(lambda x: lj(params, x, numbers, cell).sum())(positions)[0]
    assert np.isfinite(forces_cpp).all()
    np.testing.assert_allclose(forces_cpp, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# An AOTInductor package (`to_torch_export(..., compile=True)`) run by examples/cpp/run_aoti.cpp: no Python, no
# TorchScript interpreter, no autograd (the forces are JAX's derivative, compiled into the package).

LJ_PARAMS = {"sigma": np.float32(1.0), "epsilon": np.float32(1.0)}


def lj_energy(params, positions):
    """A Lennard-Jones cluster as a user writes it: all pairs, the self-pairs masked with jnp.where (twice, so
    that neither the energy nor its gradient sees 0/0)."""
    import jax.numpy as jnp

    d = positions[:, None, :] - positions[None, :, :]
    r2 = jnp.sum(d * d, axis=-1)
    self_pair = jnp.eye(positions.shape[0], dtype=bool)
    s6 = (params["sigma"] ** 2 / jnp.where(self_pair, 1.0, r2)) ** 3
    return 0.5 * jnp.sum(jnp.where(self_pair, 0.0, 4 * params["epsilon"] * (s6 * s6 - s6)))


def lj_positions(n: int, seed: int) -> np.ndarray:
    """n atoms of a jittered simple-cubic cluster, spacing 1.15 sigma: forces of order 10."""
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    return (1.15 * grid + 0.08 * np.random.default_rng(seed).standard_normal((n, 3))).astype(np.float32)


def export_lj(path: str):
    """The package the C++ program runs: exported at 8 atoms, any atom count, energy and forces."""
    from trainkit.export import to_torch_export

    return to_torch_export(lj_energy, LJ_PARAMS, (lj_positions(8, 0),), path, dynamic_axes=[{0: "atoms"}],
                           with_forces=True, compile=True)


@pytest.fixture(scope="module")
def aoti(tmp_path_factory):
    """run_aoti built and the LJ package compiled for this machine (AVX-512 where it has it); on an AVX-512
    machine, also the same model compiled for AVX2 in a subprocess (`aoti.avx2()` waits for it): torch picks the
    package's vector ISA from ATEN_CPU_CAPABILITY, and TORCHINDUCTOR_CPP_MARCH replaces the -march=native it
    compiles with otherwise (which puts AVX-512 instructions into an "AVX2" package). All three overlap."""
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    work = tmp_path_factory.mktemp("aoti")
    build, exe = start_example_build(work, "run_aoti")
    avx2_proc = None
    avx2 = work / "lj.avx2.aoti.pt2"
    if any(str(isa).startswith("avx512") for isa in valid_vec_isa_list()):
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_cpp; "
                f"test_cpp.export_lj({str(avx2)!r})")
        avx2_proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     env=cli_env(ATEN_CPU_CAPABILITY="avx2", TORCHINDUCTOR_CPP_MARCH="x86-64-v3"))

    def wait_avx2() -> Path | None:
        if avx2_proc is None:
            return None
        out, _ = avx2_proc.communicate(timeout=600)
        assert avx2_proc.returncode == 0, out[-5000:]
        return avx2

    try:
        export = export_lj(str(work / "lj.aoti.pt2"))
        _, err = build.communicate(timeout=600)
        assert build.returncode == 0, err[-5000:]
        yield types.SimpleNamespace(exe=exe, export=export, package=Path(export.package), avx2=wait_avx2,
                                    work=work)
    finally:
        for proc in (build, avx2_proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def run_aoti(aoti, package: Path, positions: np.ndarray, calls: int, **env: str) -> subprocess.CompletedProcess:
    inputs = aoti.work / f"positions{len(positions)}.bin"
    inputs.write_bytes(positions.tobytes())
    return subprocess.run([str(aoti.exe), str(package), str(inputs), str(calls), f"{len(positions)}x3"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def read_outputs(stdout: str) -> list[np.ndarray]:
    """run_aoti's stdout: "output K shape [d0, d1]" then the values, one row per line."""
    outputs, shape, rows = [], None, []
    for line in stdout.splitlines() + ["output"]:
        if line.startswith("output"):
            if shape is not None:
                outputs.append(np.array(rows, np.float64).reshape(shape))
            shape, rows = (json.loads(line.split("shape", 1)[1]) if "shape" in line else None), []
        else:
            rows.extend(float(v) for v in line.split())
    return outputs


def assert_jax_energy_and_forces(stdout: str, positions: np.ndarray) -> None:
    import jax

    energy, forces = read_outputs(stdout)
    ref_energy = jax.jit(lambda x: lj_energy(LJ_PARAMS, x))(positions)
    ref_forces = -jax.jit(jax.grad(lambda x: lj_energy(LJ_PARAMS, x)))(positions)
    assert energy.shape == () and forces.shape == positions.shape
    np.testing.assert_allclose(energy, ref_energy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(forces, ref_forces, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cpp_runs_aoti_package_with_jax_forces_on_every_call(aoti):
    """Exported at 8 atoms, run at 11 and 17: 20 calls each, every one bit for bit the first, which is JAX's
    energy and forces."""
    assert aoti.export.target["AOTI_DEVICE_KEY"] == "cpu"
    for n in (11, 17):
        positions = lj_positions(n, n)
        out = run_aoti(aoti, aoti.package, positions, 20)
        assert out.returncode == 0, out.stderr
        assert f"AOTI_CPU_ISA={aoti.export.target['AOTI_CPU_ISA']}" in out.stderr
        assert_jax_energy_and_forces(out.stdout, positions)


@pytest.mark.slow
def test_cpp_aoti_runs_a_package_only_where_its_isa_does(aoti):
    """A package holds code for one vector ISA. An AVX2 package runs on an AVX-512 machine; an AVX-512 package is
    refused in one line naming the fix where this process may only use AVX2 (ATEN_CPU_CAPABILITY=avx2, which
    libtorch's own kernels honour too: a real limit on this process, not a pretend machine)."""
    avx2 = aoti.avx2()
    if avx2 is None:
        pytest.skip("this CPU has no AVX-512: no wider package to refuse")
    positions = lj_positions(11, 11)
    refused = run_aoti(aoti, aoti.package, positions, 1, ATEN_CPU_CAPABILITY="avx2")
    assert refused.returncode == 3 and refused.stdout == "", refused.stderr
    errors = [line for line in refused.stderr.splitlines() if "cannot run" in line]
    assert len(errors) == 1 and "compile the package again on this machine" in errors[0], refused.stderr
    assert "AVX512" in errors[0] and "ATEN_CPU_CAPABILITY=avx2" in errors[0], errors[0]

    for env in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        out = run_aoti(aoti, avx2, positions, 20, **env)
        assert out.returncode == 0, out.stderr
        assert "AOTI_CPU_ISA=AVX2" in out.stderr
        assert_jax_energy_and_forces(out.stdout, positions)
