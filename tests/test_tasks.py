"""The char LM and the interatomic potential: their data, their Tasks, and pulse runs through the real CLI.

Fast tests check data determinism and shapes, the physics of the potential (forces are -dE/dx, energies do
not depend on which periodic image an atom is in, energies are extensive), that both models take any
sequence length / atom count (also through `jax.export` with symbolic dims), and that the tensor-parallel
rules shard the transformer. The slow tests train the full configs and check their goals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import train
from configs import lm_chars
from configs import potential_dense as potential  # the dense baseline; the neighbor-list one: test_neighbors.py
from trainkit import sharding
from trainkit.data import load_dataset
from trainkit.data import molecules
from trainkit.data.pipeline import eval_batches
from trainkit.errors import TrainkitError
from trainkit.logging.metrics import read_metrics
from trainkit.models import build_task
from trainkit.models.potential import energy_and_forces, pair_vectors
from trainkit.train_state import TrainState, make_optimizer

# No final export in the pulses: tests/test_export.py exports both tiny configs to every format.
PULSE = ("--config.num_steps=4", "--config.eval_every=2", "--config.log_every=2",
         "--config.export.formats=()")


@pytest.fixture(scope="module")
def lm():
    config = lm_chars.get_config("tiny")
    dataset = load_dataset(config.data)
    task = build_task(config, dataset.info)
    return config, dataset, task, jax.jit(task.init)(jax.random.key(0))


@pytest.fixture(scope="module")
def pot():
    config = potential.get_config("tiny")
    dataset = load_dataset(config.data)
    task = build_task(config, dataset.info)
    return config, dataset, task, jax.jit(task.init)(jax.random.key(0))


# -- character language model ------------------------------------------------------------------------------

def test_chars_data_is_deterministic_windows_of_stdlib_bytes(lm):
    config, dataset, _, _ = lm
    again = load_dataset(config.data)
    assert again.info == dataset.info
    seq = config.data.seq_len
    rows = np.array([0, 5, len(dataset.train) - 1])
    batch = dataset.train.take(rows)
    assert batch["tokens"].shape == (3, seq + 1) and batch["tokens"].dtype == np.int32
    np.testing.assert_array_equal(batch["tokens"][1], dataset.train[5]["tokens"])
    np.testing.assert_array_equal(batch["tokens"], again.train.take(rows)["tokens"])
    assert bytes(dataset.train[0]["tokens"].astype(np.uint8)).startswith(b"# file: textwrap.py\n")
    # Train is the head of the text, eval the tail (10%): windows never cross the boundary.
    info = dataset.info
    assert info["eval_tokens"] == pytest.approx(0.1 * (info["train_tokens"] + info["eval_tokens"]), abs=1)
    assert len(dataset.train) == info["train_tokens"] - seq  # stride 1
    assert len(dataset.eval) == config.data.max_eval_windows
    assert 2.0 < info["unigram_entropy"] < np.log(256)


def test_lm_loss_metrics_and_per_sequence_eval(lm):
    _, dataset, task, params = lm
    batch = dataset.train.take(np.arange(4))
    loss, metrics = jax.jit(task.loss)(params, batch, jax.random.key(1))
    assert set(metrics) == {"loss", "accuracy", "bits_per_byte", "perplexity"}
    assert abs(float(loss) - np.log(256)) < 0.5, "an untrained model is close to uniform over bytes"
    per_example = jax.jit(task.evaluate)(params, batch)
    shapes = {k: v.shape for k, v in per_example.items()}
    assert shapes == {"loss": (4,), "accuracy": (4,), "bits_per_byte": (4,)}
    np.testing.assert_allclose(per_example["loss"].mean(), loss, rtol=1e-5)


def test_lm_dropout_uses_the_loss_rng_and_never_evaluates_with_it(lm):
    config, dataset, plain, _ = lm
    config = config.copy_and_resolve_references()
    config.model.dropout = 0.2
    task = build_task(config, dataset.info)
    params = jax.jit(task.init)(jax.random.key(0))
    batch = dataset.train.take(np.arange(4))
    loss = jax.jit(lambda rng: task.loss(params, batch, rng)[0])
    assert loss(jax.random.key(1)) == loss(jax.random.key(1)) != loss(jax.random.key(2))
    np.testing.assert_allclose(jax.jit(task.evaluate)(params, batch)["loss"],
                               jax.jit(plain.evaluate)(params, batch)["loss"], rtol=1e-6)


def test_lm_is_causal_and_takes_any_length_up_to_max_len(lm):
    config, _, task, params = lm
    predict = jax.jit(task.predict)
    (tokens,) = task.example_inputs(0, {"batch": 2, "seq": config.model.max_len})
    logits = predict(params, tokens)
    assert logits.shape == (2, config.model.max_len, 256)
    short = predict(params, tokens[:, :7])
    np.testing.assert_allclose(short, logits[:, :7], atol=1e-5)  # a prefix sees only itself
    changed = tokens.copy()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    np.testing.assert_allclose(predict(params, changed)[:, :10], logits[:, :10], atol=1e-5)
    with pytest.raises(TrainkitError, match="max_len"):
        predict(params, np.zeros((1, config.model.max_len + 1), np.int32))


def test_lm_exports_with_symbolic_batch_and_seq(lm):
    _, _, task, params = lm
    b, s = jax.export.symbolic_shape("b, s")
    exported = jax.export.export(jax.jit(task.predict), platforms=("cpu",))(
        params, jax.ShapeDtypeStruct((b, s), jnp.int32)
    )
    for dims in ({"batch": 1, "seq": 5}, {"batch": 3, "seq": 32}):
        inputs = task.example_inputs(0, dims)
        np.testing.assert_allclose(exported.call(params, *inputs), task.predict(params, *inputs), atol=1e-5)


def test_transformer_rules_shard_attention_and_mlp_on_model_axis(lm):
    config, _, task, _ = lm
    config = config.copy_and_resolve_references()
    config.mesh.update({"data": 2, "fsdp": 2, "model": 2})
    mesh = sharding.build_mesh(config.mesh)
    tx = make_optimizer(config)
    rng = jax.random.key_data(jax.random.key(0))
    abstract = jax.eval_shape(lambda: TrainState.create(task.init(jax.random.wrap_key_data(rng)), tx, rng))
    specs = {sharding.path_name(p): s.spec
             for p, s in jax.tree_util.tree_leaves_with_path(sharding.state_shardings(abstract, mesh,
                                                                                       task.sharding_rules))}
    assert specs["params/Block_0/attn/query/kernel"] == P("fsdp", "model")
    assert specs["params/Block_0/attn/value/bias"] == P("model")
    assert specs["params/Block_0/attn/out/kernel"] == P("model", "fsdp")
    assert specs["params/Block_0/mlp/up/kernel"] == P("fsdp", "model")
    assert specs["params/Block_0/mlp/down/kernel"] == P("model", "fsdp")
    mu = [name for name in specs if name.endswith("mu/Block_0/attn/query/kernel")]
    assert mu and specs[mu[0]] == P("fsdp", "model"), "optimizer state follows its parameter"


# -- interatomic potential ---------------------------------------------------------------------------------

def test_molecule_data_is_deterministic_physical_and_dense(pot):
    config, dataset, _, _ = pot
    batch = dataset.train.take(np.arange(4))
    n = dataset.info["num_atoms"]
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "positions": ((4, n, 3), np.float32), "numbers": ((4, n), np.int32), "cell": ((4, 3, 3), np.float32),
        "energy": ((4,), np.float32), "forces": ((4, n, 3), np.float32),
    }
    molecules.generate.cache_clear()
    again = load_dataset(config.data)
    for split in ("train", "eval"):
        a, b = getattr(dataset, split).arrays, getattr(again, split).arrays
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(dataset.train.arrays["positions"][:4], dataset.eval.arrays["positions"][:4])
    everything = dataset.train.arrays
    assert set(np.unique(everything["numbers"])) == {28, 29}  # Ni and Cu
    assert np.abs(everything["forces"].sum(axis=1)).max() < 1e-4, "EMT forces sum to zero in each cell"
    assert (molecules.perpendicular_widths(everything["cell"]) > 2 * config.data.cutoff).all()
    assert dataset.info["zero_force_mae"] == pytest.approx(np.abs(dataset.eval.arrays["forces"]).mean())


def test_molecule_generator_refuses_cells_too_narrow_for_the_cutoff(pot):
    config, _, _, _ = pot
    config = config.copy_and_resolve_references()
    config.data.cutoff = 4.0
    with pytest.raises(TrainkitError, match="cutoff"):
        load_dataset(config.data)


def test_forces_are_minus_the_energy_gradient(pot):
    """Central differences of predict, in float64, against the forces the loss trains on."""
    _, dataset, task, params = pot
    batch = dataset.eval.take(np.arange(2))
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        positions = jnp.asarray(batch["positions"], jnp.float64)
        cell = jnp.asarray(batch["cell"], jnp.float64)
        numbers = jnp.asarray(batch["numbers"])
        _, forces = jax.jit(lambda x: energy_and_forces(task.predict, p64, x, numbers, cell))(positions)
        energy = jax.jit(lambda x: task.predict(p64, x, numbers, cell))
        h = 1e-5
        for atom, axis in [(0, 0), (3, 1), (17, 2)]:
            step = jnp.zeros_like(positions).at[:, atom, axis].set(h)
            numeric = -(energy(positions + step) - energy(positions - step)) / (2 * h)
            np.testing.assert_allclose(forces[:, atom, axis], numeric, rtol=1e-6, atol=1e-8)
    assert np.abs(forces).max() > 0


def test_energy_ignores_periodic_images_and_translations(pot):
    _, dataset, task, params = pot
    predict = jax.jit(task.predict)
    b = dataset.eval.take(np.arange(3))
    energy = predict(params, b["positions"], b["numbers"], b["cell"])
    shifted = b["positions"].copy()
    shifted[:, 5] += b["cell"][:, 0] - 2 * b["cell"][:, 2]  # one atom to another periodic image
    np.testing.assert_allclose(predict(params, shifted, b["numbers"], b["cell"]), energy, rtol=1e-5)
    moved = b["positions"] + np.array([0.37, -1.2, 2.9], np.float32)  # every atom by the same vector
    np.testing.assert_allclose(predict(params, moved, b["numbers"], b["cell"]), energy, rtol=1e-5)
    vectors = pair_vectors(jnp.asarray(b["positions"]), jnp.asarray(b["cell"]))
    assert float(jnp.abs(vectors - pair_vectors(jnp.asarray(shifted), jnp.asarray(b["cell"]))).max()) < 1e-4


def test_energy_is_extensive_and_takes_any_atom_count(pot):
    """A cell repeated twice along a has twice the energy (64 atoms vs 32); padding (Z=0) adds nothing."""
    _, dataset, task, params = pot
    predict = jax.jit(task.predict)
    b = dataset.eval.take(np.arange(2))
    energy = predict(params, b["positions"], b["numbers"], b["cell"])
    a = b["cell"][:, :1, :]
    double_pos = np.concatenate([b["positions"], b["positions"] + a], axis=1)
    double_cell = b["cell"].copy()
    double_cell[:, 0] *= 2
    double = predict(params, double_pos, np.tile(b["numbers"], 2), double_cell)
    np.testing.assert_allclose(double, 2 * energy, rtol=1e-5)
    padded_pos = np.concatenate([b["positions"], np.zeros((2, 3, 3), np.float32)], axis=1)
    padded_num = np.concatenate([b["numbers"], np.zeros((2, 3), np.int32)], axis=1)
    np.testing.assert_allclose(predict(params, padded_pos, padded_num, b["cell"]), energy, rtol=1e-6)


def test_potential_loss_metrics_and_finite_gradients(pot):
    _, dataset, task, params = pot
    batch = next(eval_batches(dataset.eval, 4))
    batch.pop("mask")
    loss_and_grad = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
    (_, metrics), grads = loss_and_grad(params, batch, jax.random.key(0))
    assert set(metrics) == {"loss", "energy_mae", "force_mae"}
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    per = jax.jit(task.evaluate)(params, batch)
    assert {k: v.shape for k, v in per.items()} == {"loss": (4,), "energy_mae": (4,), "force_mae": (4,)}
    _, forces = jax.jit(energy_and_forces, static_argnums=0)(
        task.predict, params, batch["positions"], batch["numbers"], batch["cell"]
    )
    np.testing.assert_allclose(per["force_mae"].mean(), np.abs(forces - batch["forces"]).mean(), rtol=1e-5)


def test_potential_exports_with_symbolic_batch_and_atoms(pot):
    _, _, task, params = pot
    b, n = jax.export.symbolic_shape("b, n")
    dims = {"batch": b, "atoms": n}
    args = [jax.ShapeDtypeStruct(tuple(dims.get(d, d) for d in s.shape), s.dtype) for s in task.inputs]
    exported = jax.export.export(jax.jit(task.predict), platforms=("cpu",))(params, *args)
    predict = jax.jit(task.predict)
    for sizes in ({"batch": 1, "atoms": 3}, {"batch": 2, "atoms": 32}):
        inputs = task.example_inputs(0, sizes)
        np.testing.assert_allclose(exported.call(params, *inputs), predict(params, *inputs), rtol=1e-5)


# -- the real CLI ------------------------------------------------------------------------------------------

def assert_pulse(workdir):
    records = read_metrics(workdir)
    assert any("train/loss" in r for r in records) and any("eval/loss" in r for r in records), records
    return records


def test_lm_chars_tiny_pulse(tmp_path):
    train(tmp_path, *PULSE, config="configs/lm_chars.py:tiny")
    records = assert_pulse(tmp_path)
    assert any("eval/bits_per_byte" in r for r in records)


def test_potential_tiny_pulse(tmp_path):
    train(tmp_path, *PULSE, config="configs/potential.py:tiny")
    records = assert_pulse(tmp_path)
    assert any("eval/force_mae" in r for r in records)
    assert (tmp_path / "checkpoints" / "best").exists()


@pytest.mark.slow
def test_lm_chars_beats_unigram_entropy(tmp_path):
    """Default config, ~2 min on 2 cores: eval loss far below the best context-free model's."""
    train(tmp_path, config="configs/lm_chars.py", timeout=900)
    entropy = load_dataset(lm_chars.get_config().data).info["unigram_entropy"]
    evals = [r["eval/loss"] for r in read_metrics(tmp_path) if "eval/loss" in r]
    assert evals[-1] < entropy - 0.75, (evals, entropy)


@pytest.mark.slow
def test_potential_forces_beat_one_fifth_of_zero_force_baseline(tmp_path):
    """Default config, ~2 min on 2 cores: eval force MAE <= 1/5 of predicting zero forces."""
    train(tmp_path, config="configs/potential.py", timeout=900)
    info = load_dataset(potential.get_config().data).info
    evals = [r for r in read_metrics(tmp_path) if "eval/force_mae" in r]
    assert evals[-1]["eval/force_mae"] <= info["zero_force_mae"] / 5, (evals, info)
    assert evals[-1]["eval/energy_mae"] <= info["reference_energy_mae"] / 5, (evals, info)
