"""TrainBatches: the order of training examples, its split over processes, and resuming at a position."""

from __future__ import annotations

import numpy as np

from trainkit.data import ArraySource
from trainkit.data.pipeline import TrainBatches, shuffled_positions

N = 37  # not a multiple of the batch: batches straddle epoch boundaries


def _source() -> ArraySource:
    return ArraySource({"x": np.arange(N, dtype=np.int64), "y": np.arange(N, dtype=np.int64) * 10})


def test_each_epoch_visits_every_example_once_in_a_new_order():
    stream = shuffled_positions(N, seed=3, positions=np.arange(4 * N))
    epochs = stream.reshape(4, N)
    for epoch in epochs:
        assert sorted(epoch) == list(range(N))
    assert len({tuple(e) for e in epochs}) == 4
    assert not np.array_equal(epochs[0], shuffled_positions(N, seed=4, positions=np.arange(N)))


def test_batches_follow_the_stream_across_epoch_boundaries():
    batches = TrainBatches(_source(), global_batch=8, seed=3)
    got = np.concatenate([next(batches)["x"] for _ in range(10)])
    np.testing.assert_array_equal(got, shuffled_positions(N, 3, np.arange(80)))


def test_processes_load_contiguous_slices_of_the_same_global_batch():
    whole = TrainBatches(_source(), global_batch=8, seed=3, prefetch=0)
    parts = [TrainBatches(_source(), 8, 3, process_index=p, process_count=2, prefetch=0) for p in range(2)]
    for _ in range(6):
        np.testing.assert_array_equal(next(whole)["x"], np.concatenate([next(p)["x"] for p in parts]))


def test_resuming_at_a_saved_position_continues_with_the_next_batch():
    batches = TrainBatches(_source(), global_batch=8, seed=3)
    for _ in range(5):
        next(batches)
    position = batches.get_state()
    expected = [next(batches)["y"] for _ in range(4)]
    resumed = TrainBatches(_source(), global_batch=8, seed=3)
    resumed.set_state(position)
    for want in expected:
        np.testing.assert_array_equal(next(resumed)["y"], want)
