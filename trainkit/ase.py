"""An ASE calculator for an exported potential (`model.pt`), needing only torch and ase — no JAX, no training stack.
(For a metatomic export, `--format metatomic`, use metatomic's own `metatomic_ase.MetatomicCalculator`.)

    from trainkit.ase import TorchScriptCalculator
    atoms.calc = TorchScriptCalculator("runs/pot/export/model.pt")
    atoms.get_potential_energy(), atoms.get_forces()

Forces and stress are JAX's own derivatives, translated into the module (no autograd at run time). Input dtypes
(float32 or float64, `--dtype`) are read from the embedded `model.json`.

Threads: the calculator runs torch on one intra-op thread unless told otherwise (`num_threads`). An MD rank
shares its node with other ranks as a rule, and torch's default thread pool (one thread per core) collapses
when its cores are busy (BENCHMARKS.md measures both).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int32": torch.int32, "int64": torch.int64}


def load_exported(path: str) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The TorchScript module and its embedded sidecar (`torch.jit.load`, never pickle)."""
    extra = {"model.json": ""}
    module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    module.eval()
    return module, json.loads(extra["model.json"] or "{}")


class TorchScriptCalculator(Calculator):
    """Energy (eV), forces (eV/Å) and, for a neighbor-list potential, stress (eV/Å³) and per-atom energies (eV)
    from a trainkit-exported potential.

    Two kinds of `.pt`, told apart by the embedded sidecar's inputs:
    - neighbor list (configs/potential.py): `forward(positions (N,3), numbers (N,), cell (3,3), edge_i (E,),
      edge_j (E,), shifts (E,3))` -> `(energy, forces, stress, energies)`; the calculator builds the full
      neighbor list at the sidecar's cutoff (vesin if installed, else ASE's), for any cell, small ones included.
    - dense (configs/potential_dense.py): `forward(positions (1,N,3), numbers (1,N), cell (1,3,3))` ->
      `(energy (1,), forces (1,N,3))`.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model_path: str, num_threads: int | None = 1, **kwargs: Any):
        """num_threads: torch's intra-op threads for this process (a process-wide torch setting), or None to
        leave it as it is."""
        super().__init__(**kwargs)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.module, self.sidecar = load_exported(model_path)
        outputs = [o["name"] for o in self.sidecar.get("outputs", [])]
        if "forces" not in outputs:
            raise ValueError(f"{model_path} is not an exported potential (outputs: {outputs}); "
                             "export a model trained with configs/potential.py")
        self._dtypes = [_DTYPES[i["dtype"]] for i in self.sidecar["inputs"]]
        self.neighbors = [i["name"] for i in self.sidecar["inputs"]][3:] == ["edge_i", "edge_j", "shifts"]
        if not self.neighbors:
            self.implemented_properties = ["energy", "free_energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        positions = np.asarray(self.atoms.get_positions())
        numbers = np.asarray(self.atoms.get_atomic_numbers())
        cell = np.asarray(self.atoms.get_cell()[:])
        if not self.neighbors:
            args = [positions[None], numbers[None], cell[None]]
        else:
            args = [positions, numbers, cell, *neighbor_list(self.atoms, float(self.sidecar["cutoff"]))]
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(t) for a, t in zip(args, self._dtypes)]
        with torch.inference_mode():
            out = [o.double().numpy() for o in self.module(*tensors)]
        if not self.neighbors:
            energy, forces = float(out[0][0]), out[1][0]
            self.results = {"energy": energy, "free_energy": energy, "forces": forces}
            return
        energy, forces, stress, energies = out
        self.results = {"energy": float(energy), "free_energy": float(energy), "forces": forces,
                        "energies": energies}
        if self.atoms.cell.rank == 3:
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)


def neighbor_list(atoms: Any, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The full list (edge_i, edge_j, shifts) within `cutoff` of `atoms`, any cell (periodic images included)."""
    try:
        import vesin
    except ImportError:
        from ase.neighborlist import neighbor_list as ase_list

        i, j, shifts = ase_list("ijS", atoms, cutoff)
    else:
        periodic = bool(atoms.pbc.all())
        box = atoms.get_cell()[:] if periodic else np.zeros((3, 3))
        i, j, shifts = vesin.NeighborList(cutoff=cutoff, full_list=True).compute(
            np.asarray(atoms.get_positions(), np.float64), np.asarray(box, np.float64), periodic, quantities="ijS")
    return i.astype(np.int64), j.astype(np.int64), np.asarray(shifts).reshape(-1, 3).astype(np.int64)
