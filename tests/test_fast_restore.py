"""Restore at disk speed (trainkit.checkpoints.fast_restore): a local state of large arrays, saved by trainkit's
CheckpointManager as a zarr per array, reads back bit-equal to Orbax's own restore, into the target shardings
(here a mesh of the 8 test devices); layouts it does not read (OCDBT, compression) are left to Orbax."""

from __future__ import annotations

import io
import contextlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trainkit.checkpoints.fast_restore import read_state
from trainkit.checkpoints.manager import CheckpointManager, restore_step
from trainkit.checkpoints.meta import CheckpointMeta
from trainkit.config import base_config


def save(workdir, state, compression: bool = False):
    config = base_config()
    config.checkpoint.keep_best, config.checkpoint.compression = 0, compression
    manager = CheckpointManager(workdir, config)
    with contextlib.redirect_stdout(io.StringIO()):
        manager.save(1, state, {"next_index": 0}, CheckpointMeta(model="test", step=1))
        manager.close()
    return manager.step_dir(1)


def big_state(sharding) -> dict:
    rng = np.random.default_rng(0)
    return {"kernel": jax.device_put(rng.standard_normal((1024, 1536), dtype=np.float32), sharding),
            "bias": jax.device_put(rng.standard_normal((512,), dtype=np.float32), jax.devices()[0]),
            "count": jax.device_put(np.int32(7), jax.devices()[0]),
            "key": jax.device_put(rng.integers(0, 2**32, (2,), dtype=np.uint32), jax.devices()[0])}


def abstract_of(state, **shardings):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings.get(k, v.sharding)) for k, v in state.items()}


def orbax_restore(step_dir, abstract):
    args = ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(step_dir / "state", args=args)


@pytest.mark.parametrize("saved_spec", [P(), P("data", None), P(None, "model"), P("data", "model")])
def test_reads_bit_equal_to_orbax_into_the_target_shardings(tmp_path, saved_spec):
    """Saved whole or in shards (chunks along the first axis, the second, or both), read into another sharding."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    state = big_state(NamedSharding(mesh, saved_spec))
    step_dir = save(tmp_path / "w", state)
    assert not (step_dir / "state" / "manifest.ocdbt").exists()  # arrays of 1.5 MB on average: a zarr per array
    target = NamedSharding(mesh, P(None, "model"))  # another sharding than the one saved
    abstract = abstract_of(state, kernel=target)
    fast = read_state(step_dir / "state", abstract)
    assert fast is not None, "the plain layout was not read by the fast path"
    reference = orbax_restore(step_dir, abstract)
    for key in state:
        assert fast[key].sharding == abstract[key].sharding
        assert fast[key].dtype == reference[key].dtype and fast[key].shape == reference[key].shape
        assert np.array_equal(np.asarray(fast[key]), np.asarray(reference[key]))
        assert np.array_equal(np.asarray(fast[key]), np.asarray(state[key]))
    restored = restore_step(step_dir, abstract)
    assert all(np.array_equal(np.asarray(restored.state[k]), np.asarray(state[k])) for k in state)


@pytest.mark.parametrize("compression", [False, True])
def test_other_layouts_are_left_to_orbax(tmp_path, compression):
    small = {"w": jax.device_put(np.arange(12, dtype=np.float32).reshape(3, 4))}  # small arrays: OCDBT
    state = small if not compression else big_state(jax.devices()[0])
    step_dir = save(tmp_path / "w", state, compression=compression)
    abstract = abstract_of(state)
    assert read_state(step_dir / "state", abstract) is None
    restored = restore_step(step_dir, abstract)
    assert all(np.array_equal(np.asarray(restored.state[k]), np.asarray(state[k])) for k in state)


def test_a_target_of_another_shape_or_dtype_is_left_to_orbax(tmp_path):
    state = big_state(jax.devices()[0])
    step_dir = save(tmp_path / "w", state)
    wrong = abstract_of(state)
    wrong["kernel"] = jax.ShapeDtypeStruct((1024, 1536), np.float16, sharding=wrong["kernel"].sharding)
    assert read_state(step_dir / "state", wrong) is None
