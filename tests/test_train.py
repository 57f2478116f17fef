"""Training through the real CLI: pulse runs, determinism, sharding across 8 devices, and user errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import FAST, assert_user_error, run_cli, train
from trainkit.logging.metrics import read_metrics


def losses(workdir) -> list[float]:
    return [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]


def test_default_config_pulse(tmp_path):
    train(tmp_path, *FAST)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "train/loss" in r] == [5, 10, 15, 20]
    assert {"eval/loss", "eval/accuracy"} <= set(records[-1]) | set(records[-2])
    assert all(r["steps_per_sec"] > 0 for r in records if "steps_per_sec" in r)
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert config["num_steps"] == 20 and config["model"]["name"] == "cnn"
    assert list((tmp_path / "tensorboard").iterdir()), "no TensorBoard event file"


@pytest.mark.slow
def test_same_seed_same_losses_bit_for_bit(tmp_path):
    args = ("--config.num_steps=12", "--config.log_every=1", "--config.eval_every=100", "--config.checkpoint.every=0")
    train(tmp_path / "a", *args)
    train(tmp_path / "b", *args)
    train(tmp_path / "c", *args, "--config.seed=1")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def test_mlp_variant_trains(tmp_path):
    train(tmp_path, *FAST, config="configs/default.py:mlp")
    assert json.loads((tmp_path / "train_config.json").read_text())["model"]["name"] == "mlp"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/default.py", "configs/lm_chars.py:tiny"])
def test_8_device_mesh_matches_1_device(tmp_path, config):
    """data=2, fsdp=2, model=2 on 8 fake devices gives the 1-device losses up to summation order (the
    transformer really splits its attention/MLP kernels over `model`)."""
    args = ("--config.num_steps=10", "--config.log_every=1", "--config.eval_every=100", "--config.checkpoint.every=0",
            "--config.batch_size=16", "--config.export.formats=()")
    train(tmp_path / "one", *args, devices=1, config=config)
    train(tmp_path / "eight", *args, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.model=2",
          devices=8, config=config)
    np.testing.assert_allclose(losses(tmp_path / "eight"), losses(tmp_path / "one"), rtol=2e-5, atol=1e-6)


def sharded_state(config):
    """The initial TrainState of `config` on a data=2, fsdp=2, model=2 mesh of the 8 fake devices."""
    from trainkit.train import build_experiment

    config.mesh.update({"data": 2, "fsdp": 2, "model": 2})
    return build_experiment(config).init_state()


def test_state_is_sharded_over_fsdp_and_model():
    """Parameters and optimizer state are really split across the 8 devices (shapes per device)."""
    from configs import default
    from trainkit import sharding

    state = sharded_state(default.get_config())
    kernel = state.params["Dense_0"]["kernel"]  # (1024, 128) for the CNN on 8x8 digits
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    assert {s.data.shape for s in kernel.addressable_shards} == {(kernel.shape[0] // 2, kernel.shape[1])}
    moments = {sharding.path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if sharding.path_name(p).endswith("Dense_0/kernel")}
    assert len(moments) == 2, moments.keys()  # Adam's mu and nu
    for leaf in moments.values():
        assert leaf.sharding.spec == kernel.sharding.spec, "optimizer state must follow its parameter"
    assert state.step.sharding.spec == jax.sharding.PartitionSpec()


# -- user errors: one line, exit != 0, no traceback ----------------------------------------------------------

def test_missing_config_file(tmp_path):
    proc = run_cli("--config=configs/nope.py", f"--workdir={tmp_path}")
    assert_user_error(proc, "configs/nope.py", "does not exist")


def test_unknown_config_key(tmp_path):
    proc = run_cli("--config=configs/default.py", f"--workdir={tmp_path}", "--config.nmu_steps=3")
    assert_user_error(proc, "nmu_steps")


def test_wrong_type_config_value(tmp_path):
    proc = run_cli("--config=configs/default.py", f"--workdir={tmp_path}", "--config.num_steps=many")
    assert_user_error(proc, "num_steps")


def test_mesh_that_does_not_divide_devices(tmp_path):
    proc = run_cli("--config=configs/default.py", f"--workdir={tmp_path}", "--config.mesh.data=3", devices=8)
    assert_user_error(proc, "mesh", "8")


def test_batch_not_divisible_by_data_parallel(tmp_path):
    proc = run_cli("--config=configs/default.py", f"--workdir={tmp_path}", "--config.batch_size=100", devices=8)
    assert_user_error(proc, "batch_size=100", "8")


def test_read_only_workdir(read_only_dir):
    ro = read_only_dir()
    assert_user_error(run_cli("--config=configs/default.py", f"--workdir={ro / 'w'}"), "workdir")


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli("--config=configs/default.py", f"--workdir={blocker / 'w'}")
    assert_user_error(proc, "workdir")


@pytest.mark.slow
def test_default_config_reaches_95_percent(tmp_path):
    train(tmp_path, "--config.log_every=50")
    evals = [r["eval/accuracy"] for r in read_metrics(tmp_path) if "eval/accuracy" in r]
    assert evals[-1] >= 0.95, evals


def test_transformer_kernels_split_over_model_and_fsdp():
    from configs import lm_chars
    from trainkit import sharding

    state = sharded_state(lm_chars.get_config("tiny"))
    leaves = {sharding.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}
    query = leaves["params/Block_0/attn/query/kernel"]
    assert "model" in query.sharding.spec and "fsdp" in query.sharding.spec, query.sharding.spec
    full = query.shape
    assert {s.data.shape for s in query.addressable_shards} == {(full[0] // 2, full[1] // 2)}
    for name, leaf in leaves.items():
        if name.endswith("Block_0/attn/query/kernel") and name.startswith("opt_state"):
            assert leaf.sharding.spec == query.sharding.spec, name
