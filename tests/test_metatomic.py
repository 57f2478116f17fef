"""A trained neighbor-list potential in simulators written by others (issue #15).

One real training run (configs/potential.py:tiny), exported the way a user types it, from the run's own directory
with relative paths: `python -m trainkit.export runs/pot -o model.pt --format metatomic --dtype float64` (and
float32, and the plain TorchScript `.pt`). Then, in processes that never import JAX or trainkit's training stack:
- metatomic's ASE calculator and trainkit's TorchScript calculator: energy, forces, stress and per-atom energies
  equal JAX's at two atom counts, in float32 (1e-5) and float64 (1e-10);
- NVE molecular dynamics through metatomic's ASE calculator: bounded energy drift;
- a cell relaxation that uses the stress;
- i-PI driving the model through its metatomic client on a local socket;
- TorchSim's metatomic model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, cli_env

pytest.importorskip("metatomic.torch", reason="the [metatomic] extra is installed by .ci/run")
pytestmark = pytest.mark.slow

RTOL = {"float32": 1e-5, "float64": 1e-10}


def _run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A scratch directory holding runs/pot (trained) and the exports, made with relative paths from there."""
    cwd = tmp_path_factory.mktemp("md")
    (cwd / "configs").symlink_to(ROOT / "configs")
    _run(["-m", "trainkit.main", "--config=configs/potential.py:tiny", "--workdir=runs/pot",
          "--config.export.formats=('pt',)"], cwd)
    for dtype in ("float32", "float64"):
        _run(["-m", "trainkit.export", "runs/pot", "-o", f"metatomic-{dtype}.pt", "--format", "metatomic",
              "--dtype", dtype], cwd)
        _run(["-m", "trainkit.export", "runs/pot", "-o", f"plain-{dtype}.pt", "--dtype", dtype], cwd)
    return cwd


def _structures() -> list:
    """A 32-atom rattled, sheared CuNi cell and a 108-atom one (two atom counts; neither from training)."""
    from ase.build import bulk

    out = []
    for repeat, seed in ((2, 1), (3, 2)):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
        rng = np.random.default_rng(seed)
        atoms.numbers = rng.choice([28, 29], len(atoms))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + rng.uniform(-0.02, 0.02, (3, 3))), scale_atoms=True)
        atoms.rattle(0.05, seed=seed)
        out.append(atoms)
    return out


def _jax_reference(workdir: Path, atoms, dtype: str) -> dict[str, np.ndarray]:
    import jax

    from trainkit.ase import neighbor_list
    from trainkit.checkpoints.sources import resolve_source
    from trainkit.export.checkpoint import in_dtype, load_params_and_task

    task, params, _ = load_params_and_task(resolve_source(str(workdir / "checkpoints" / "final")).step_dir)
    with jax.enable_x64(dtype == "float64"):
        task, params = in_dtype(task, params, dtype)
        i, j, s = neighbor_list(atoms, task.cutoff)
        args = (atoms.positions.astype(dtype), atoms.numbers.astype(np.int32), atoms.cell[:].astype(dtype),
                i.astype(np.int32), j.astype(np.int32), s.astype(np.int32))
        out = jax.jit(task.predict)(params, *args)
        return {name: np.asarray(o, np.float64) for name, o in zip(task.outputs, out)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_metatomic_and_torchscript_calculators_equal_jax_without_jax(run, tmp_path, dtype):
    structures = _structures()
    np.savez(tmp_path / "structures.npz", **{f"{k}_{name}": getattr(a, name) if name != "cell" else a.cell[:]
                                              for k, a in enumerate(structures)
                                              for name in ("positions", "numbers", "cell")})  # exact, not text
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from ase import Atoms
        from metatomic_ase import MetatomicCalculator
        from trainkit.ase import TorchScriptCalculator
        data = np.load({str(tmp_path / 'structures.npz')!r})
        out = {{}}
        for k in range({len(structures)}):
            atoms = Atoms(numbers=data[f"{{k}}_numbers"], positions=data[f"{{k}}_positions"], cell=data[f"{{k}}_cell"],
                          pbc=True)
            for kind, calc in (("metatomic", MetatomicCalculator({str(run / f'metatomic-{dtype}.pt')!r})),
                               ("plain", TorchScriptCalculator({str(run / f'plain-{dtype}.pt')!r}))):
                atoms.calc = calc
                for call in range(3):  # an MD loop calls it again and again
                    atoms.calc.reset()
                    out[f"{{kind}}_{{k}}_{{call}}_energy"] = np.array(atoms.get_potential_energy())
                    out[f"{{kind}}_{{k}}_{{call}}_forces"] = atoms.get_forces()
                    out[f"{{kind}}_{{k}}_{{call}}_stress"] = atoms.get_stress(voigt=False)
                    out[f"{{kind}}_{{k}}_{{call}}_energies"] = atoms.get_potential_energies()
        np.savez({str(tmp_path / 'out.npz')!r}, **out)
        assert "jax" not in sys.modules and "trainkit.train" not in sys.modules, "JAX was imported"
    """)
    _run(["-c", script], tmp_path)
    got = np.load(tmp_path / "out.npz")
    for k, atoms in enumerate(structures):
        ref = _jax_reference(run / "runs" / "pot", atoms, dtype)
        assert np.abs(ref["stress"]).max() > 0 and np.abs(ref["forces"]).max() > 0
        for kind in ("metatomic", "plain"):
            for name, value in ref.items():
                first = got[f"{kind}_{k}_0_{name}"]
                for call in (1, 2):
                    np.testing.assert_array_equal(got[f"{kind}_{k}_{call}_{name}"], first)
                scale = max(np.abs(value).max(), 0.1)
                assert np.abs(first - value).max() <= RTOL[dtype] * scale, (kind, k, name, dtype)


def test_nve_md_and_a_cell_relaxation_through_metatomic(run, tmp_path):
    script = textwrap.dedent(f"""
        import json, sys, numpy as np
        from ase import units
        from ase.build import bulk
        from ase.filters import FrechetCellFilter
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
        from ase.md.verlet import VelocityVerlet
        from ase.optimize import FIRE
        from metatomic_ase import MetatomicCalculator
        model = {str(run / 'metatomic-float64.pt')!r}
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
        atoms.numbers[::3] = 28
        atoms.calc = MetatomicCalculator(model)
        MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
        energies = []
        dyn = VelocityVerlet(atoms, 1.0 * units.fs)
        dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=10)
        dyn.run(300)
        relax = bulk("Cu", "fcc", a=3.75, cubic=True).repeat(2)  # strained: a nonzero stress
        relax.numbers[::3] = 28
        relax.calc = MetatomicCalculator(model)
        before = float(np.abs(relax.get_stress()).max())
        cell0 = relax.cell[:].copy()
        FIRE(FrechetCellFilter(relax), logfile=None).run(fmax=1e-3, steps=200)
        after = float(np.abs(relax.get_stress()).max())
        print(json.dumps({{"energies": energies, "n": len(atoms), "before": before, "after": after,
                          "cell_change": float(np.abs(relax.cell[:] - cell0).max())}}))
        assert "jax" not in sys.modules
    """)
    result = json.loads(_run(["-c", script], tmp_path).stdout.strip().splitlines()[-1])
    energies = np.array(result["energies"])
    assert len(energies) == 31 and np.isfinite(energies).all()
    drift = np.abs(energies - energies[0]).max() / result["n"]
    assert drift < 1e-3, f"NVE energy drift {drift:.2e} eV/atom over 300 fs"
    assert result["before"] > 1e-3 and result["after"] < 0.2 * result["before"], result
    assert result["cell_change"] > 1e-3, result


def test_ipi_drives_the_model_through_its_metatomic_client(run, tmp_path):
    pytest.importorskip("ipi", reason="the [simulators] extra (i-PI) is installed by .ci/run")
    from ase.build import bulk
    from ase.io import write

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    atoms.numbers[::4] = 28
    write(tmp_path / "init.xyz", atoms)  # i-PI reads positions and the cell from an extended xyz
    socket = f"trainkit-{os.getpid()}"
    (tmp_path / "input.xml").write_text(textwrap.dedent(f"""
        <simulation verbosity="low">
          <output prefix="md">
            <properties stride="5" filename="out">[ step, time{{picosecond}}, conserved{{electronvolt}},
              potential{{electronvolt}}, kinetic_md{{electronvolt}} ]</properties>
          </output>
          <total_steps>40</total_steps>
          <prng><seed>12345</seed></prng>
          <ffsocket name="metatomic" mode="unix"><address>{socket}</address></ffsocket>
          <system>
            <initialize nbeads="1">
              <file mode="ase">init.xyz</file>
              <velocities mode="thermal" units="kelvin">300</velocities>
            </initialize>
            <forces><force forcefield="metatomic"/></forces>
            <motion mode="dynamics">
              <dynamics mode="nve"><timestep units="femtosecond">1.0</timestep></dynamics>
            </motion>
            <ensemble><temperature units="kelvin">300</temperature></ensemble>
          </system>
        </simulation>
    """))
    env = cli_env()
    server = subprocess.Popen([shutil.which("i-pi") or "i-pi", "input.xml"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(3)  # i-PI opens its socket
        driver = subprocess.run(
            [shutil.which("i-pi-py_driver") or "i-pi-py_driver", "-u", "-a", socket, "-m", "metatomic", "-o",
             f"template=init.xyz,model={run / 'metatomic-float64.pt'}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        log = server.communicate(timeout=120)[0]
    finally:
        server.kill()
    assert server.returncode == 0, log[-3000:] + driver.stderr[-3000:]
    rows = np.loadtxt(tmp_path / "md.out", ndmin=2)
    assert rows[:, 0].tolist() == list(range(0, 41, 5))
    conserved = rows[:, 2]
    assert np.isfinite(rows).all() and np.abs(conserved - conserved[0]).max() / len(atoms) < 1e-3


def test_torchsim_metatomic_model_equals_jax(run):
    pytest.importorskip("torch_sim", reason="the [simulators] extra (torch-sim-atomistic) is installed by .ci/run")
    import torch
    import torch_sim as ts
    from torch_sim.models.metatomic import MetatomicModel

    atoms = _structures()[0]
    model = MetatomicModel(model=str(run / "metatomic-float64.pt"), device="cpu")
    state = ts.io.atoms_to_state([atoms], device=torch.device("cpu"), dtype=torch.float64)
    out = model(state)
    ref = _jax_reference(run / "runs" / "pot", atoms, "float64")
    assert float(out["energy"][0]) == pytest.approx(float(ref["energy"]), rel=1e-10)
    np.testing.assert_allclose(out["forces"].numpy(), ref["forces"], rtol=0, atol=1e-10 * np.abs(ref["forces"]).max())
    # TorchSim's stress is the ASE sign convention's (eV/Å³)
    np.testing.assert_allclose(out["stress"][0].numpy(), ref["stress"], rtol=0,
                               atol=1e-10 * max(np.abs(ref["stress"]).max(), 0.1))
