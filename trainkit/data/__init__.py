"""Datasets: generated or shipped by a package, never downloaded. `load_dataset(config.data)` picks one.

A dataset is a pair of random-access sources (train, eval) of example dicts plus `info` that sizes the model
(number of classes, vocabulary, species). Batching, sharding over processes and the checkpointable position
live in `trainkit.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping, Protocol, Sequence

import ml_collections
import numpy as np

from trainkit.errors import TrainkitError

Example = Mapping[str, np.ndarray]


class Source(Protocol):
    """Random access to examples: `len(src)` and `src[i]` -> {name: array without batch dim}."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """Examples stored as equal-length arrays in memory: example i is {k: v[i]}."""

    arrays: Mapping[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> Example:
        return {k: v[index] for k, v in self.arrays.items()}

    def take(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """A stacked batch of the given examples (fast path used by the pipeline)."""
        idx = np.asarray(indices)
        return {k: v[idx] for k, v in self.arrays.items()}


@dataclasses.dataclass(frozen=True)
class Dataset:
    train: Source
    eval: Source
    info: Mapping[str, Any]


DATASETS = {
    "digits": "trainkit.data.digits",
    "chars": "trainkit.data.chars",
    "molecules": "trainkit.data.molecules",
    "neighbors": "trainkit.data.neighbors",
}


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The dataset named by `config.name` (`--config.data.name`)."""
    name = config.name
    if name not in DATASETS:
        raise TrainkitError(f"unknown dataset {name!r}; set --config.data.name to one of {sorted(DATASETS)}")
    return importlib.import_module(DATASETS[name]).load(config)
