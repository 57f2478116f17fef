"""Interatomic potential on neighbor lists for rattled Cu/Ni fcc cells labelled by ASE's EMT (energy, forces,
stress). Linear in atoms, exact for any cutoff relative to the cell; outputs energy, forces, stress, per-atom
energies. The dense all-pairs baseline is `configs/potential_dense.py`.

    python -m trainkit.main --config=configs/potential.py --workdir=runs/pot
    python -m trainkit.main --config=configs/potential.py:tiny --workdir=runs/pot_tiny   # seconds, for tests

Goal: eval force MAE at most 1/5 of the zero-force baseline (`zero_force_mae` in the dataset info).
Measured (seed 0, 2 shared CPU cores): 600 steps, 49 s wall (22 s of CPU); eval force MAE 0.066 eV/Å against
a zero-force MAE of 0.91 eV/Å (1/14; 1/5 is passed by step 200), energy MAE 2.3 meV/atom against 116 meV/atom
for per-species reference energies alone, stress MAE 1.1e-3 eV/Å³ against 2.0e-2 eV/Å³ for zero stress (1/18).
The dense baseline (configs/potential_dense.py) reaches 0.065 eV/Å in ~1.5 min. The best checkpoint is the
one with the lowest eval/force_mae.
"""

import ml_collections

from trainkit.config import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.data = ml_collections.ConfigDict({
        "name": "neighbors",  # full neighbor lists (vesin), padded to one (atoms, edges) bucket
        "elements": ("Cu", "Ni"),
        "repeat": 2,  # 2x2x2 conventional fcc cells: 32 atoms
        "num_train": 320,
        "num_eval": 64,
        "rattles_per_cell": 8,
        "rattle": (0.03, 0.06, 0.1, 0.15),  # Å, Gaussian displacement stdevs
        "strain": 0.02,
        "cutoff": 3.3,  # Å; any value (cells narrower than twice the cutoff give several images)
        "seed": 0,
    })
    config.model = ml_collections.ConfigDict({
        "name": "neighbor_potential", "features": 32, "num_rbf": 16, "rounds": 2,
        "energy_weight": 1.0, "force_weight": 1.0, "stress_weight": 1.0,
    })
    config.num_steps = 600
    config.batch_size = 16
    config.learning_rate = 3e-3
    config.warmup_steps = 50
    config.log_every = 50
    config.eval_every = 200
    config.checkpoint.every = 200
    config.checkpoint.best_metric = "eval/force_mae"
    config.checkpoint.best_mode = "min"
    config.export.formats = ("pt", "stablehlo", "safetensors")  # the .pt goes to ASE / libtorch simulators
    if arg == "tiny":
        config.data.update({"num_train": 32, "num_eval": 16})
        config.model.update({"features": 8, "num_rbf": 8, "rounds": 1})
        config.num_steps = 20
        config.batch_size = 8
        config.warmup_steps = 0
        config.log_every = 5
        config.eval_every = 10
        config.checkpoint.every = 10
    elif arg:
        raise ValueError(f"configs/potential.py: unknown argument {arg!r}; use 'tiny' or nothing")
    return config
