"""The exported potential loads in C++ with the libtorch that ships in the torch wheel: same energy and forces."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, train


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
def test_cpp_libtorch_matches_python(tmp_path):
    import torch

    train(tmp_path / "pot", "--config.num_steps=10", "--config.log_every=5", "--config.eval_every=10",
          "--config.export.formats=('pt',)", config="configs/potential.py:tiny")
    model = tmp_path / "pot" / "export" / "model.pt"
    exe = compile_example(tmp_path)

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
