"""The TorchScript exporter, end to end: real Flax models → .pt → a fresh torch-only process.

Each exported file is loaded in a subprocess that has neither JAX nor trainkit imported and is run on a batch
(and atom count, sequence length) different from the export example; outputs and forces must match JAX to
1e-5 relative to the largest reference magnitude (`parity`'s max_rel).
"""

from __future__ import annotations

import json
import os
import shutil
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

from trainkit.errors import TrainkitError
from trainkit.export.torchscript import parity, to_torchscript

RTOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")
rng = np.random.default_rng(0)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.gelu(nn.Dense(16)(x))
        return nn.Dense(4)(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # NHWC
        x = nn.max_pool(nn.relu(nn.Conv(4, (3, 3))(x)), (2, 2), strides=(2, 2))
        x = nn.avg_pool(nn.silu(nn.Conv(6, (3, 3), padding="VALID")(x)), (2, 2), strides=(1, 1), padding="SAME")
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, deterministic=True)(nn.LayerNorm()(x), mask=mask)
        return x + nn.Dense(16)(nn.gelu(nn.Dense(32)(nn.LayerNorm()(x))))


class Decoder(nn.Module):
    """Decoder-only transformer: token + position embeddings, causal self-attention, logits."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(11, 16)(tokens) + nn.Embed(32, 16)(jnp.arange(tokens.shape[1]))[None]
        mask = nn.make_causal_mask(tokens)
        for _ in range(2):
            x = Block()(x, mask)
        logits = nn.Dense(11)(nn.LayerNorm()(x))
        return jax.nn.log_softmax(logits), jax.nn.softmax(logits)[..., 0]


def _inverse_3x3(cell):
    a, b, c = cell[..., 0, :], cell[..., 1, :], cell[..., 2, :]
    adj = jnp.stack([jnp.cross(b, c), jnp.cross(c, a), jnp.cross(a, b)], axis=-1)
    return adj / jnp.sum(a * jnp.cross(b, c), axis=-1)[..., None, None]


class Potential(nn.Module):
    """Energy per structure from periodic pairwise distances, Gaussian RBFs with a cosine cutoff and species."""

    cutoff: float = 3.0
    num_rbf: int = 8

    @nn.compact
    def __call__(self, positions, species, cell):  # (B, N, 3), (B, N) atomic numbers, (B, 3, 3) rows = lattice
        d = positions[:, None, :, :] - positions[:, :, None, :]
        frac = jnp.einsum("bijk,bkl->bijl", d, _inverse_3x3(cell))
        frac -= jnp.round(frac)  # minimum image
        d = jnp.einsum("bijk,bkl->bijl", frac, cell)
        n = positions.shape[1]
        pair = ~jnp.eye(n, dtype=bool)[None]
        r2 = jnp.sum(d * d, axis=-1)
        r = jnp.where(pair, jnp.sqrt(jnp.where(pair, r2, 1.0)), 0.0)  # no NaN gradient at the self-pair
        mu = jnp.linspace(0.0, self.cutoff, self.num_rbf)
        rbf = jnp.exp(-4.0 * (r[..., None] - mu) ** 2)
        fc = jnp.where(pair & (r < self.cutoff), 0.5 * (jnp.cos(jnp.pi * r / self.cutoff) + 1.0), 0.0)
        h = nn.Embed(10, 16)(species)
        msg = jnp.einsum("bijk,bjk->bik", nn.Dense(16)(rbf) * fc[..., None], h)
        e = nn.Dense(1)(nn.silu(nn.Dense(16)(jnp.concatenate([h, msg], axis=-1))))
        return jnp.sum(e[..., 0], axis=1)


def _random_params(model, *example):
    """Random parameters from numpy: `model.init` would spend seconds compiling threefry on 2 slow cores."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *example)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0] if len(s.shape) > 1 else 4))
                        .astype(s.dtype), shapes)


def _structures(batch, atoms):
    cell = np.diag([4.0, 4.5, 5.0]).astype(np.float32) + rng.uniform(-0.3, 0.3, (batch, 3, 3)).astype(np.float32)
    frac = rng.uniform(0, 1, (batch, atoms, 3)).astype(np.float32)
    positions = np.einsum("bij,bjk->bik", frac, cell).astype(np.float32)
    species = rng.choice(np.array([1, 6, 8], np.int32), (batch, atoms))
    return positions, species, cell


def _run_standalone(tmp_path: Path, cases: dict[str, dict]) -> dict[str, float]:
    """Load each `.pt` in a torch-only subprocess, run it on the given inputs, return max_rel per case."""
    for name, case in cases.items():
        np.savez(tmp_path / f"{name}.npz", *case["inputs"])
        np.savez(tmp_path / f"{name}.expected.npz", *case["expected"])
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np, torch
        assert "jax" not in sys.modules and "trainkit" not in sys.modules
        errors = {{}}
        for name in {sorted(cases)!r}:
            module = torch.jit.load(f"{tmp_path}/{{name}}.pt")
            inputs = np.load(f"{tmp_path}/{{name}}.npz")
            expected = np.load(f"{tmp_path}/{{name}}.expected.npz")
            out = module(*[torch.from_numpy(inputs[k]) for k in inputs.files])
            out = [out] if isinstance(out, torch.Tensor) else list(out)
            assert len(out) == len(expected.files), name
            rel = 0.0
            for got, k in zip(out, expected.files):
                ref = expected[k].astype(np.float64)
                got = got.detach().double().numpy()
                assert got.shape == ref.shape, (name, got.shape, ref.shape)
                rel = max(rel, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)))
            errors[name] = rel
        assert "jax" not in sys.modules and "trainkit" not in sys.modules
        print(json.dumps(errors))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _export(tmp_path, name, fn, params, args, dynamic_axes, **kw):
    module = to_torchscript(fn, params, args, str(tmp_path / f"{name}.pt"), dynamic_axes=dynamic_axes, **kw)
    assert module.parity["max_rel"] <= RTOL, module.parity
    return module


def test_mlp_cnn_transformer_run_standalone_on_other_sizes(tmp_path):
    mlp, cnn, dec = MLP(), CNN(), Decoder()
    x, img, tok = (rng.standard_normal((3, 5)).astype(np.float32), rng.standard_normal((2, 8, 8, 1)).astype(
        np.float32), rng.integers(0, 11, (2, 6)).astype(np.int32))
    models = {"mlp": (mlp, x, [{0: "batch"}]), "cnn": (cnn, img, [{0: "batch"}]),
              "decoder": (dec, tok, [{0: "batch", 1: "seq"}])}
    other = {"mlp": rng.standard_normal((7, 5)).astype(np.float32),
             "cnn": rng.standard_normal((5, 8, 8, 1)).astype(np.float32),
             "decoder": rng.integers(0, 11, (3, 9)).astype(np.int32)}
    cases = {}
    for name, (model, example, axes) in models.items():
        params = _random_params(model, example)
        _export(tmp_path, name, model.apply, params, (example,), axes)
        expected = jax.tree.leaves(jax.jit(model.apply)(params, other[name]))
        cases[name] = {"inputs": [other[name]], "expected": [np.asarray(e) for e in expected]}
    errors = _run_standalone(tmp_path, cases)
    assert all(e <= RTOL for e in errors.values()), errors


def test_energy_model_energy_and_forces_standalone(tmp_path):
    model = Potential()
    example = _structures(2, 5)
    params = _random_params(model, *example)
    axes = [{0: "batch", 1: "atoms"}, {0: "batch", 1: "atoms"}, {0: "batch"}]
    names = ["positions", "species", "cell"]
    module = _export(tmp_path, "forces", model.apply, params, example, axes, with_forces=True, input_names=names,
                     extra_files={"model.json": json.dumps({"inputs": names})})
    _export(tmp_path, "energy", model.apply, params, example, axes, input_names=names)

    inputs = _structures(3, 7)
    energy = jax.jit(model.apply)(params, *inputs)
    forces = -jax.jit(jax.grad(lambda p: jnp.sum(model.apply(params, p, *inputs[1:]))))(inputs[0])
    assert np.abs(forces).max() > 1e-3  # the check below would be vacuous without real forces
    errors = _run_standalone(tmp_path, {"forces": {"inputs": inputs, "expected": [energy, forces]},
                                        "energy": {"inputs": inputs, "expected": [energy]}})
    assert all(e <= RTOL for e in errors.values()), errors

    # in-process too: the returned module equals the saved one, forces by autograd through plain forward
    assert parity(model.apply, params, module, inputs, with_forces=True)["max_rel"] <= RTOL
    extra = {"model.json": ""}
    torch.jit.load(str(tmp_path / "forces.pt"), _extra_files=extra)
    assert json.loads(extra["model.json"]) == {"inputs": names}
    plain = torch.jit.load(str(tmp_path / "energy.pt"))
    pos = torch.from_numpy(inputs[0]).requires_grad_(True)
    plain(pos, torch.from_numpy(inputs[1]), torch.from_numpy(inputs[2])).sum().backward()
    assert np.abs(-pos.grad.numpy() - np.asarray(forces)).max() <= RTOL * np.abs(forces).max()


CPP_LOADER = r"""
#include <torch/script.h>
#include <cstdio>
int main(int argc, char** argv) {
  torch::jit::Module model = torch::jit::load(argv[1]);
  torch::jit::Module data = torch::jit::load(argv[2]);  // the inputs, as buffers x0, x1, ...
  std::vector<torch::jit::IValue> inputs;
  for (int i = 0; i < std::atoi(argv[3]); ++i) inputs.push_back(data.attr("x" + std::to_string(i)).toTensor());
  auto outputs = model.forward(inputs).toTuple();
  for (const auto& out : outputs->elements()) {
    torch::Tensor t = out.toTensor().to(torch::kFloat64).contiguous().flatten();
    for (int64_t k = 0; k < t.numel(); ++k) std::printf("%.17g ", t[k].item<double>());
    std::printf("\n");
  }
}
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a C++ compiler")
def test_energy_and_forces_from_cpp_libtorch(tmp_path):
    torch_dir = Path(torch.__file__).parent
    (tmp_path / "load.cpp").write_text(CPP_LOADER)
    compile_ = subprocess.Popen(  # compiling takes a while; export meanwhile
        ["g++", "-std=c++20", "-O0", "load.cpp", "-o", "load", f"-I{torch_dir}/include",
         f"-I{torch_dir}/include/torch/csrc/api/include", f"-L{torch_dir}/lib", "-ltorch", "-ltorch_cpu", "-lc10",
         f"-Wl,-rpath,{torch_dir}/lib"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    model = Potential()
    example = _structures(1, 4)
    params = _random_params(model, *example)
    axes = [{0: "batch", 1: "atoms"}, {0: "batch", 1: "atoms"}, {0: "batch"}]
    to_torchscript(model.apply, params, example, str(tmp_path / "model.pt"), dynamic_axes=axes, with_forces=True)
    inputs = _structures(2, 6)
    holder = torch.nn.Module()
    for i, x in enumerate(inputs):
        holder.register_buffer(f"x{i}", torch.from_numpy(x))
    torch.jit.save(torch.jit.script(holder), str(tmp_path / "inputs.pt"))
    energy = jax.jit(model.apply)(params, *inputs)
    forces = -jax.jit(jax.grad(lambda p: jnp.sum(model.apply(params, p, *inputs[1:]))))(inputs[0])

    assert compile_.wait(timeout=300) == 0, compile_.stderr.read()[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(["./load", "model.pt", "inputs.pt", "3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got_energy, got_forces = (np.array(line.split(), np.float64) for line in proc.stdout.strip().splitlines())
    for got, ref in ((got_energy, energy), (got_forces, forces)):
        ref = np.asarray(ref, np.float64).ravel()
        assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()


def test_module_rejects_inputs_that_contradict_the_signature():
    module = to_torchscript(lambda p, x, y: x * p + y.sum(), np.float32(2.0),
                            (np.ones((2, 3), np.float32), np.ones((2,), np.float32)),
                            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, input_names=["x", "y"])
    assert module(torch.ones(4, 3), torch.ones(4)).shape == (4, 3)
    with pytest.raises(torch.jit.Error, match="axis 1 must have size 3"):
        module(torch.ones(4, 2), torch.ones(4))
    with pytest.raises(torch.jit.Error, match="must equal dynamic size 'n'"):
        module(torch.ones(4, 3), torch.ones(5))


def test_unsupported_primitive_fails_naming_it_and_where():
    def spectral(params, x):
        return jnp.abs(jnp.fft.fft(x * params))

    where = r"\(at .*test_torchscript.py:\d+:\d+ \(.*spectral\) inside jit 'fft'\)"
    with pytest.raises(TrainkitError, match=rf"primitive 'fft' {where} is not supported"):
        to_torchscript(spectral, np.float32(1.0), (np.ones((2, 4), np.float32),))


def test_bad_dynamic_axes_are_user_errors():
    args = (np.ones((2, 3), np.float32),)
    with pytest.raises(TrainkitError, match="not inputs"):
        to_torchscript(lambda p, x: x, {}, args, dynamic_axes={"nope": {0: "b"}})
    bounded = r"cannot trace the model with dynamic axis 'b' .*dim_constraints=\['b >= 2'\]"
    with pytest.raises(TrainkitError, match=bounded):
        to_torchscript(lambda p, x: jax.lax.dynamic_slice(x, (0, 0), (2, 3)), {}, args, dynamic_axes=[{0: "b"}])
