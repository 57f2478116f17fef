"""An ASE calculator for an exported potential (`model.pt`), needing only torch and ase — no JAX, no training stack.

    from trainkit.ase import TorchScriptCalculator
    atoms.calc = TorchScriptCalculator("runs/pot/export/model.pt")
    atoms.get_potential_energy(), atoms.get_forces()

The module's `forward(positions (1,N,3), numbers (1,N), cell (1,3,3))` returns `(energy (1,), forces (1,N,3))`;
forces come from autograd inside TorchScript. Input dtypes are read from the embedded `model.json`.
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

    def __init__(self, model_path: str, **kwargs: Any):
        super().__init__(**kwargs)
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
        energy, forces = self.module(positions, numbers, cell)
        e = float(energy.detach()[0])
        self.results = {"energy": e, "free_energy": e, "forces": forces.detach()[0].double().numpy()}
