"""The exported potential loads in C++ with the libtorch that ships in the torch wheel: same energy and forces,
on every call (libtorch's default executor optimizes the graph after the first calls)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, train


@pytest.fixture(scope="module")
def run_potential(tmp_path_factory) -> Path:
    return compile_example(tmp_path_factory.mktemp("cpp"))


def compile_example(build: Path) -> Path:
    import torch
    from torch.utils import cpp_extension

    exe = build / "run_potential"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdir = cpp_extension.library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = ["g++", "-std=c++17", "-O1", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
           str(ROOT / "examples" / "cpp" / "run_potential.cpp"), "-o", str(exe),
           f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-ltorch", "-ltorch_cpu", "-lc10"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    return exe


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
