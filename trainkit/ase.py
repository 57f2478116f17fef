"""An ASE calculator for an exported potential (`model.pt`), needing only torch and ase — no JAX, no training stack.

    from trainkit.ase import TorchScriptCalculator
    atoms.calc = TorchScriptCalculator("runs/pot/export/model.pt")
    atoms.get_potential_energy(), atoms.get_forces()

The module's `forward(positions (1,N,3), numbers (1,N), cell (1,3,3))` returns `(energy (1,), forces (1,N,3))`;
forces are JAX's own derivative, translated into the module (no autograd at run time). Input dtypes are read
from the embedded `model.json`.

Threads: the calculator runs torch on one intra-op thread unless told otherwise (`num_threads`). An MD rank
shares its node with other ranks as a rule, and torch's default thread pool (one thread per core) collapses when
its cores are busy: measured on this 2-core machine under load, 1 thread was 8-40x faster than the default.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int32": torch.int32, "int64": torch.int64}


def load_exported(path: str) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The TorchScript module and its embedded sidecar (`torch.jit.load`, never pickle)."""
    extra = {"model.json": ""}
    module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    module.eval()
    return module, json.loads(extra["model.json"] or "{}")


class TorchScriptCalculator(Calculator):
    """Energy (eV) and forces (eV/Å) from a trainkit-exported potential."""

    implemented_properties = ["energy", "free_energy", "forces"]

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

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        pos_t, num_t, cell_t = self._dtypes
        positions = torch.from_numpy(np.asarray(self.atoms.get_positions())[None]).to(pos_t)
        numbers = torch.from_numpy(np.asarray(self.atoms.get_atomic_numbers())[None]).to(num_t)
        cell = torch.from_numpy(np.asarray(self.atoms.get_cell()[:])[None]).to(cell_t)
        with torch.inference_mode():
            energy, forces = self.module(positions, numbers, cell)
        e = float(energy.detach()[0])
        self.results = {"energy": e, "free_energy": e, "forces": forces.detach()[0].double().numpy()}
