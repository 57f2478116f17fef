"""Molecular dynamics with an exported trainkit potential: ASE + torch only (no JAX, no trainkit training stack).

    python examples/md_with_exported_model.py runs/pot/export/model.pt --steps 500

Runs NVE (velocity Verlet) on a rattled 2x2x2 fcc Cu/Ni cell at ~300 K and reports the total-energy drift.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from ase import units
from ase.build import bulk
from ase.md.velocitydistribution import Stationary, thermalize_momenta
from ase.md.verlet import VelocityVerlet

from trainkit.ase import TorchScriptCalculator


def run_md(model: str, steps: int = 500, timestep_fs: float = 1.0, temperature_k: float = 300.0,
           seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    atoms.numbers[rng.permutation(len(atoms))[: len(atoms) // 4]] = 28  # a Cu3Ni-like alloy
    atoms.rattle(0.02, seed=seed)
    atoms.calc = TorchScriptCalculator(model)
    thermalize_momenta(atoms, temperature_K=temperature_k, rng=rng)
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    totals = []

    def record() -> None:
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())

    dyn.attach(record, interval=1)
    dyn.run(steps)
    totals_arr = np.array(totals)
    n = len(atoms)
    return {
        "atoms": n,
        "steps": steps,
        "timestep_fs": timestep_fs,
        "energy_start_eV": float(totals_arr[0]),
        "max_drift_eV_per_atom": float(np.max(np.abs(totals_arr - totals_arr[0])) / n),
        "final_drift_eV_per_atom": float((totals_arr[-1] - totals_arr[0]) / n),
        "temperature_K": float(atoms.get_temperature()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an exported potential, e.g. W/export/model.pt")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--timestep_fs", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=300.0)
    args = parser.parse_args(argv)
    report = run_md(args.model, args.steps, args.timestep_fs, args.temperature)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
