"""What makes an exported module trustworthy on other people's JAX code (issue #14), as specifications:

- masked pair potentials (a NaN in the masked-off self-pair, as every jax-md pair potential has) give JAX's
  finite forces on every call, in float32 and float64, in a process without JAX, with and without autograd;
- a module answers the same on call 1, 2 and 20, and the export's own check proves it on two sizes;
- outputs that are ~0 everywhere are not a false alarm;
- constant PRNG keys (flax's nn.RNN, nnx Rngs in eval mode) export; input-dependent keys are one-line refusals;
- a dynamic size with a maximum (`min(64, seq)`) exports with `dim_constraints`, and the error says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from trainkit.errors import TrainkitError
from trainkit.export.torchscript import to_torchscript

space = pytest.importorskip("jax_md.space", reason="the [corpus] extra (jax-md) is installed by .ci/run")
energy = pytest.importorskip("jax_md.energy", reason="the [corpus] extra (jax-md) is installed by .ci/run")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
CALLS = 20


def lennard_jones(params, positions):
    """jax-md's Lennard-Jones pair potential (dense, periodic): a safe sqrt of the squared distance (0 for the
    self-pair), sigma / r (inf there), nan_to_num, a multiplicative cutoff, and the self-pairs masked out."""
    displacement, _ = space.periodic(params["box"])
    return energy.lennard_jones_pair(displacement, sigma=params["sigma"], epsilon=1.0, r_cutoff=2.5)(positions)


def _positions(n: int, dtype, seed: int = 0) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * 1.2
    return (grid + np.random.default_rng(seed).normal(0, 0.05, grid.shape)).astype(dtype)


def _standalone(tmp_path: Path, model: Path, inputs: list[np.ndarray], calls: int, grad: bool) -> list[np.ndarray]:
    """Outputs of `calls` calls (each saved) of `model` in a process that never imports JAX; with `grad`, the
    module's output summed and differentiated by torch autograd with respect to the first input instead."""
    np.savez(tmp_path / "in.npz", *inputs)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np, torch
        module = torch.jit.load({str(model)!r})
        data = np.load({str(tmp_path / 'in.npz')!r})
        xs = [torch.from_numpy(data[k]) for k in data.files]
        results = []
        for _ in range({calls}):
            if {grad}:
                x = xs[0].clone().requires_grad_(True)
                out = module(x, *xs[1:])
                out = out[0] if isinstance(out, tuple) else out
                (g,) = torch.autograd.grad(out.sum(), [x])
                results.append(g.numpy())
            else:
                out = module(*xs)
                results += [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]
        np.savez({str(tmp_path / 'out.npz')!r}, *results)
        assert "jax" not in sys.modules and "trainkit" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    return [out[k] for k in out.files]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_pair_potential_forces_are_jax_forces_on_every_call(tmp_path, dtype):
    params = {"sigma": dtype(1.0), "box": dtype(3.6)}
    model = tmp_path / "lj.pt"
    with jax.enable_x64(dtype == np.float64):
        module = to_torchscript(lennard_jones, params, [_positions(8, dtype)], str(model),
                                dynamic_axes=[{0: "atoms"}], with_forces=True,
                                parity_tolerance=1e-4 if dtype == np.float32 else 1e-10)
        assert [s[0][0] for s in module.parity["sizes"]] == [8, 7]  # checked on two sizes
        x = _positions(12, dtype, seed=1)
        energy = float(lennard_jones(params, x))
        forces = -np.asarray(jax.grad(lambda r: lennard_jones(params, r))(x))
    assert np.isfinite(forces).all()
    results = _standalone(tmp_path, model, [x], CALLS, grad=False)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for k in range(CALLS):
        got_energy, got_forces = results[2 * k], results[2 * k + 1]
        assert got_forces.dtype == dtype
        np.testing.assert_array_equal(got_forces, results[1])  # every call the same bits
        assert abs(float(got_energy) - energy) <= tol * abs(energy)
        assert np.abs(got_forces - forces).max() <= tol * np.abs(forces).max(), k


def test_torch_autograd_through_a_masked_module_stays_finite_on_every_call(tmp_path):
    """The same potential exported without forces: torch autograd of the translated graph, which the profiling
    executor takes over from the 2nd call, must select (not multiply by) masks."""
    params = {"sigma": np.float32(1.0), "box": np.float32(3.6)}
    model = tmp_path / "lj_energy.pt"
    to_torchscript(lennard_jones, params, [_positions(8, np.float32)], str(model), dynamic_axes=[{0: "atoms"}])
    x = _positions(12, np.float32, seed=1)
    grad = np.asarray(jax.grad(lambda r: lennard_jones(params, r))(x))
    grads = _standalone(tmp_path, model, [x], CALLS, grad=True)
    for k, g in enumerate(grads):
        assert np.isfinite(g).all(), k
        assert np.abs(g - grad).max() <= 1e-4 * np.abs(grad).max(), k


def test_outputs_near_zero_are_not_a_false_alarm():
    w = np.full((4, 3), 50.0, np.float32)
    x = np.abs(np.random.default_rng(0).normal(size=(5, 4))).astype(np.float32) + 1.0
    module = to_torchscript(lambda p, v: jnp.tanh(v @ p) - 1.0 + 1e-7 * v[:, :3], w, [x], dynamic_axes=[{0: "b"}])
    assert module.parity["max_rel"] <= 1e-4


def test_flax_rnn_with_its_constant_carry_key_exports():
    x = np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32)
    for model in (nn.RNN(nn.LSTMCell(8)), nn.Bidirectional(nn.RNN(nn.GRUCell(4)), nn.RNN(nn.GRUCell(4)))):
        params = model.init(jax.random.key(0), x)
        module = to_torchscript(model.apply, params, [x], dynamic_axes=[{0: "b", 1: "t"}])
        assert module.parity["max_rel"] <= 1e-5
        assert len(module.parity["sizes"]) == 2


def test_nnx_module_in_eval_mode_exports_with_its_rng_state():
    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.linear = nnx.Linear(3, 6, rngs=rngs)
            self.norm = nnx.BatchNorm(6, rngs=rngs)
            self.drop = nnx.Dropout(0.3, rngs=rngs)

        def __call__(self, x):
            return self.drop(nnx.relu(self.norm(self.linear(x))))

    model = Block(nnx.Rngs(0))
    model.eval()
    graphdef, state = nnx.split(model)
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    module = to_torchscript(lambda s, v: nnx.merge(graphdef, s)(v), state, [x], dynamic_axes=[{0: "b"}])
    assert module.parity["max_rel"] <= 1e-5


def test_a_key_that_depends_on_the_input_is_a_one_line_refusal():
    def noisy(params, x, seed):
        return x + jax.random.normal(jax.random.key(seed), x.shape)

    with pytest.raises(TrainkitError) as e:
        to_torchscript(noisy, {}, [np.zeros(3, np.float32), np.int32(0)])
    message = str(e.value)
    assert "\n" not in message and "random_seed" in message and "pass random numbers in as an input" in message


def test_a_bounded_dynamic_size_exports_with_dim_constraints():
    table = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)

    def positional(p, x):  # Hugging Face's GPT-2 style: a table of 64 positions cut to the sequence: min(64, seq)
        return x + p[None, : x.shape[1], :]

    x = np.ones((2, 7, 4), np.float32)
    with pytest.raises(TrainkitError) as e:
        to_torchscript(positional, table, [x], dynamic_axes=[{0: "b", 1: "seq"}])
    assert "dim_constraints=['seq <= 64']" in str(e.value) and "\n" not in str(e.value)
    module = to_torchscript(positional, table, [x], dynamic_axes=[{0: "b", 1: "seq"}], dim_constraints=["seq <= 64"])
    assert module(torch.ones(3, 64, 4)).shape == (3, 64, 4)
    with pytest.raises(torch.jit.Error, match="dynamic size 'seq' must be <= 64"):
        module(torch.ones(1, 65, 4))


def test_platform_dependent_code_exports_its_default_branch():
    cell = np.diag([3.0, 4.0, 5.0]).astype(np.float32)
    module = to_torchscript(lambda p, c: jnp.diagonal(c) * p, np.float32(2.0), [cell])
    np.testing.assert_array_equal(module(torch.from_numpy(cell)).numpy(), [6.0, 8.0, 10.0])


def test_parity_records_its_shapes_in_the_sidecar_json(tmp_path):
    module = to_torchscript(lambda p, x: x * p, np.float32(3.0), [np.ones((4, 2), np.float32)],
                            dynamic_axes=[{0: "n"}])
    assert json.loads(json.dumps(module.parity))["sizes"] == [[[4, 2]], [[3, 2]]]


def test_a_run_time_failure_in_the_interpreter_is_one_line_naming_the_op():
    from trainkit.export.torchscript import call_repeatedly

    class Broken(torch.nn.Module):  # what a wrong translation looks like: a Long mask where torch wants a bool
        def forward(self, x):
            return x.masked_fill(x.long(), 0.0)

    with pytest.raises(TrainkitError) as e:
        call_repeatedly(torch.jit.script(Broken()), [torch.ones(3)])
    message = str(e.value)
    assert "\n" not in message and "masked_fill_ only supports boolean masks" in message
    assert "`return x.masked_fill(x.long(), 0.0)`" in message and "converter bug" in message


def test_an_unsupported_primitive_in_the_derivative_says_so():
    """max pooling differentiates to select_and_scatter_add: the forward exports, with_forces says why not."""
    def pooled(params, x):
        return jnp.sum(nn.max_pool(x * params, (2, 2), strides=(2, 2)))

    x = np.random.default_rng(0).normal(size=(1, 4, 4, 1)).astype(np.float32)
    to_torchscript(pooled, np.float32(2.0), [x])
    with pytest.raises(TrainkitError, match="select_and_scatter_add.*JAX's derivative of the model"):
        to_torchscript(pooled, np.float32(2.0), [x], with_forces=True)


def test_index_inputs_are_not_cut_into_a_false_alarm():
    """Neighbor-list style: edge indices into a dynamic atoms axis. Cutting the atoms short would leave indices
    past the end (JAX clamps them, the translation need not): the export checks the example size only."""
    def pair_sum(params, x, i, j):
        return jax.ops.segment_sum(jnp.sum((x[j] - x[i]) ** 2, -1) * params, i, num_segments=x.shape[0])

    x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    i, j = np.array([0, 1, 2, 5, 4], np.int32), np.array([5, 2, 1, 0, 3], np.int32)
    module = to_torchscript(pair_sum, np.float32(0.5), [x, i, j], dynamic_axes=[{0: "atoms"}, {0: "edges"},
                                                                                 {0: "edges"}])
    assert module.parity["sizes"] == [[[6, 3], [5], [5]]] and module.parity["max_rel"] <= 1e-6
