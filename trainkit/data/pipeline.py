"""Batches from a Source: deterministic from (seed, position), sharded over processes, checkpointable.

The k-th global batch holds examples `order[k*B : (k+1)*B]` of a seeded, per-epoch reshuffled order; process p
loads only its contiguous slice of it. The position (`{"next_index": k}`) is the same on every process, so a
run saved by N processes resumes exactly on M processes with the same global batch.

Each epoch's order is one numpy permutation seeded by (seed, epoch), drawn once. Not grain's per-index `shuffle`:
its cycle walk costs more the smaller the dataset (~65 us per index on the 1437 digits, ~8 ms of GIL-holding work
per batch of 128), which cost the default config about a quarter of its steps/s (see BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Iterator, Mapping

import grain
import numpy as np

from trainkit.data import Source


def take(source: Source, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Stack the examples at `indices` into a batch (uses the source's vectorised `take` when it has one)."""
    fast = getattr(source, "take", None)
    if fast is not None:
        return fast(indices)
    examples = [source[int(i)] for i in indices]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


@functools.lru_cache(maxsize=4)
def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the examples in one epoch (8 bytes per example: less than the in-memory examples)."""
    order = np.random.default_rng([seed, epoch]).permutation(size)
    order.setflags(write=False)
    return order


def shuffled_positions(size: int, seed: int, positions: np.ndarray) -> np.ndarray:
    """Example indices at ascending stream `positions` of the endless, per-epoch reshuffled order."""
    epochs, within = np.divmod(positions, size)
    return np.concatenate([epoch_order(size, seed, int(e))[within[epochs == e]] for e in np.unique(epochs)])


class TrainBatches:
    """An endless iterator of process-local training batches with a JSON-serialisable position."""

    def __init__(
        self,
        source: Source,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 4,
    ):
        local = global_batch // process_count
        size = len(source)
        first = process_index * local

        def load(k: int) -> dict[str, np.ndarray]:
            start = k * global_batch + first
            return take(source, shuffled_positions(size, seed, np.arange(start, start + local)))

        batches = grain.MapDataset.range(sys.maxsize // global_batch).map(load)
        self._dataset = batches.to_iter_dataset(
            grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
        )
        self._iterator = iter(self._dataset)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position: which global batch comes next."""
        return dict(self._iterator.get_state())

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue at exactly the batch after the one last consumed when `state` was taken."""
        self._iterator = iter(self._dataset)
        self._iterator.set_state(dict(state))


def eval_batches(
    source: Source, global_batch: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """The whole eval set once, in order, as process-local batches; the last is padded, `mask` marks real rows."""
    n = len(source)
    local = global_batch // process_count
    for start in range(0, n, global_batch):
        idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
        mask = idx < n
        batch = take(source, np.where(mask, idx, 0))
        batch["mask"] = mask.astype(np.float32)
        yield batch
