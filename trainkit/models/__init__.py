"""Models: each module builds a `Task` — a Flax module plus what training and export need of it.

`build_task(config, data_info)` picks the module by `config.model.name`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import jax
import ml_collections

from trainkit.errors import TrainkitError

Params = Any
Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One input of `Task.predict`. `shape` names symbolic dims by string ("batch", "atoms", "seq");
    exporters turn them into `jax.export` symbolic dims, and the sidecar writes them as null."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class Task:
    """A model together with what the train loop, the evaluator and the exporters need of it.

    init(rng) -> params                              pure; run under jax.eval_shape and jit
    loss(params, batch, rng) -> (loss, metrics)      scalar loss and scalar metrics (names without prefix)
    evaluate(params, batch) -> {name: (B,) array}    per-example values; the evaluator takes masked means
    predict(params, *inputs) -> output | tuple       the function that export serializes
    example_inputs(seed, dims) -> tuple of numpy     inputs for `predict` with the symbolic dims set by
                                                     `dims` (e.g. {"batch": 3, "atoms": 5}); parity checks
    sharding_rules: ((regex on the param path, per-dim mesh axes), ...) for tensor ('model') parallelism;
      fsdp sharding is added on top by trainkit.sharding.
    has_forces: predict's first output is an energy whose -gradient w.r.t. the first input are forces.
    atomic_energies(params, numbers (N,), edge_i (E,), edge_j (E,), vectors (E, 3)) -> (N,)   potentials on
      neighbor lists: per-atom energies from numbers, edge indices and pair vectors (r_j - r_i + periodic image);
      what the metatomic export wraps. None for other models.
    cutoff: the neighbor-list cutoff (Å) `atomic_energies` needs its list built at; None for other models.
    """

    name: str
    init: Callable[[jax.Array], Params]
    loss: Callable[[Params, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
    evaluate: Callable[[Params, Batch], dict[str, jax.Array]]
    predict: Callable[..., Any]
    inputs: tuple[InputSpec, ...]
    outputs: tuple[str, ...]
    example_inputs: Callable[[int, Mapping[str, int]], tuple[Any, ...]]
    sharding_rules: tuple[tuple[str, tuple[str | None, ...]], ...] = ()
    has_forces: bool = False
    atomic_energies: Callable[..., Any] | None = None
    cutoff: float | None = None


MODELS = {
    "mlp": "trainkit.models.mlp",
    "cnn": "trainkit.models.cnn",
    "transformer": "trainkit.models.transformer",
    "potential": "trainkit.models.potential",
    "neighbor_potential": "trainkit.models.neighbors",
}


def build_task(config: ml_collections.ConfigDict, data_info: Mapping[str, Any]) -> Task:
    """The Task for `config.model.name`, sized by the dataset's `data_info` (classes, vocab, species)."""
    name = config.model.name
    if name not in MODELS:
        raise TrainkitError(f"unknown model {name!r}; set --config.model.name to one of {sorted(MODELS)}")
    module = importlib.import_module(MODELS[name])
    return module.build(config.model, data_info)
