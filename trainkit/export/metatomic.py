"""The `metatomic` row of `FORMATS`: a potential as a metatomic `AtomisticModel` (`.pt`), the interface through
which LAMMPS (`pair_style metatomic`), i-PI, ASE (`metatomic_ase.MetatomicCalculator`), TorchSim and GROMACS load
machine-learned potentials. The file needs torch and metatomic only: no JAX, no trainkit.

    python -m trainkit.export runs/pot -o model.pt --format metatomic [--dtype float64]

What is inside: the task's `atomic_energies(params, numbers, edge_i, edge_j, vectors)` and JAX's own derivative
of their sum with respect to the pair vectors, translated to TorchScript together (`to_torchscript`), wrapped
in `TrainkitAtomistic`. The engine gives a full neighbor list at the model's cutoff. The wrapper returns the
energy as `E + sum(dE/dv · (v - v.detach()))`, which has E's value and E's exact first derivative with respect
to the pair vectors. So the engine's own autograd through the vectors gives forces and stress (virial), as
with any metatomic model. The derivative is JAX's, so it cannot depend on how TorchScript differentiates the
translated graph. Per-atom energies (`sample_kind="atom"`) carry each pair's term on its first atom: their sum
differentiates exactly, but a single atom's energy has no exact gradient of its own.
"""

import json  # no `from __future__ import annotations`: TorchScript and metatomic read the real annotations
from pathlib import Path
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import (AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput, NeighborListOptions,
                             System)

from trainkit.errors import TrainkitError
from trainkit.export.formats import ArtifactSpec, Report
from trainkit.export.parity import measure
from trainkit.export.torchscript import to_torchscript
from trainkit.models import Task


class TrainkitAtomistic(torch.nn.Module):
    """metatomic's model interface around a translated `(vectors, numbers, edge_i, edge_j) -> (energies, dE/dv)`."""

    def __init__(self, energies: torch.jit.ScriptModule, cutoff: float):
        super().__init__()
        self.energies = energies
        self.neighbors = NeighborListOptions(cutoff=cutoff, full_list=True, strict=True, requestor="trainkit")

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.neighbors]

    def forward(self, systems: List[System], outputs: Dict[str, ModelOutput],
                selected_atoms: Optional[Labels] = None) -> Dict[str, TensorMap]:
        if "energy" not in outputs:
            return {}
        per_atom = outputs["energy"].sample_kind == "atom"
        values: List[torch.Tensor] = []
        samples: List[torch.Tensor] = []
        for s, system in enumerate(systems):
            pairs = system.get_neighbor_list(self.neighbors)
            first = pairs.samples.values[:, 0]
            vectors = pairs.values.reshape(-1, 3)
            energies, grad = self.energies(vectors.detach(), system.types.to(torch.int32),
                                           first.to(torch.int32), pairs.samples.values[:, 1].to(torch.int32))
            # E's value, and through the pair vectors E's exact first derivative (JAX's, computed in the module)
            linear = (grad.detach() * (vectors - vectors.detach())).sum(dim=1)
            atoms = energies.detach() + torch.zeros_like(energies).index_add(0, first.to(torch.int64), linear)
            if per_atom:
                values.append(atoms.reshape(-1, 1))
                index = torch.arange(atoms.shape[0], device=atoms.device)
                samples.append(torch.stack([torch.full_like(index, s), index], dim=1))
            else:
                values.append(atoms.sum().reshape(1, 1))
                samples.append(torch.tensor([[s]], device=atoms.device))
        names = ["system", "atom"] if per_atom else ["system"]
        block = TensorBlock(values=torch.cat(values), samples=Labels(names, torch.cat(samples).to(torch.int32)),
                            components=[], properties=Labels(["energy"], torch.tensor([[0]], device=values[0].device)))
        if selected_atoms is not None and per_atom:
            keep = selected_atoms.values
            mask = (block.samples.values[:, None, :] == keep[None, :, :]).all(dim=2).any(dim=1)
            block = TensorBlock(values=block.values[mask], samples=Labels(names, block.samples.values[mask]),
                                components=[], properties=block.properties)
        return {"energy": TensorMap(Labels(["_"], torch.tensor([[0]], device=values[0].device)), [block])}


def pair_inputs(positions: np.ndarray, cell: np.ndarray, edge_i: np.ndarray, edge_j: np.ndarray,
                shifts: np.ndarray) -> np.ndarray:
    """The pair vectors r_j - r_i + shifts @ cell, as metatomic's neighbor lists hold them."""
    return positions[edge_j] - positions[edge_i] + shifts.astype(cell.dtype) @ cell  # (int32 @ float32 is float64)


def energies_and_pair_gradient(task: Task, params: Any):
    """`(vectors, numbers, edge_i, edge_j) -> (per-atom energies, d sum(energies) / d vectors)`, in JAX."""
    def fn(p: Any, vectors: jax.Array, numbers: jax.Array, edge_i: jax.Array, edge_j: jax.Array):
        def total(v: jax.Array):
            energies = task.atomic_energies(p, numbers, edge_i, edge_j, v)
            return jnp.sum(energies), energies

        (_, energies), grad = jax.value_and_grad(total, has_aux=True)(vectors)
        return energies, grad
    return fn


def write_metatomic(task: Task, params: Any, path: Path, spec: ArtifactSpec) -> Report:
    """Translate the task's atomic energies, wrap them as an `AtomisticModel`, save it, and check the saved file
    in metatomic's own ASE calculator against JAX (energy, forces, stress, per-atom energies)."""
    if task.atomic_energies is None or task.cutoff is None:
        raise TrainkitError(f"--format metatomic needs a potential on neighbor lists (configs/potential.py); the "
                            f"'{task.name}' model computes no per-atom energies from pair vectors")
    dtype = np.dtype(spec.args[0].dtype).name
    module = to_torchscript(energies_and_pair_gradient(task, params), params,
                            _pair_args(task.example_inputs(0, {"atoms": 8})),
                            dynamic_axes=[{0: "edges"}, {0: "atoms"}, {0: "edges"}, {0: "edges"}],
                            input_names=["vectors", "numbers", "edge_i", "edge_j"], parity_tolerance=None)
    capabilities = ModelCapabilities(
        outputs={"energy": ModelOutput(unit="eV", sample_kind="atom")},  # per atom, and per system by a sum
        atomic_types=atomic_types(spec), interaction_range=float(task.cutoff), length_unit="angstrom",
        supported_devices=["cpu", "cuda"], dtype=dtype)
    metadata = ModelMetadata(name=f"trainkit-{task.name}", description=json.dumps(spec.metadata.get("source", {})))
    AtomisticModel(TrainkitAtomistic(module, float(task.cutoff)).eval(), metadata, capabilities).save(str(path))
    return _measure(path, spec)


def atomic_types(spec: ArtifactSpec) -> list[int]:
    """The atomic numbers the model was trained on (config.data.elements), else those of the check inputs."""
    from ase.data import atomic_numbers

    elements = spec.metadata.get("config", {}).get("data", {}).get("elements")
    if elements:
        return sorted(atomic_numbers[e] for e in elements)
    return sorted(int(z) for z in np.unique(spec.args[1]) if z > 0)


def _measure(path: Path, spec: ArtifactSpec) -> Report:
    """The saved file, loaded by metatomic's ASE calculator (which builds its own neighbor list), on the check
    structure: energy, forces, stress and per-atom energies against JAX's."""
    import ase
    from metatomic_ase import MetatomicCalculator

    positions, numbers, cell = spec.args[:3]
    atoms = ase.Atoms(numbers=numbers, positions=positions, cell=cell, pbc=bool(np.abs(cell).sum() > 0))
    atoms.calc = MetatomicCalculator(str(path), check_consistency=True)
    got = {"energy": np.asarray(atoms.get_potential_energy()), "forces": atoms.get_forces(),
           "stress": atoms.get_stress(voigt=False), "energies": atoms.get_potential_energies()}
    return measure(spec, {name: got[name] for name in spec.ref})


def _pair_args(inputs: tuple) -> tuple[np.ndarray, ...]:
    positions, numbers, cell, edge_i, edge_j, shifts = inputs
    return pair_inputs(positions, cell, edge_i, edge_j, shifts), numbers, edge_i, edge_j
