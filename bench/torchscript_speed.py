"""5. TorchScript export vs. `jax.jit`: forward speed and parity of trainkit's own models (goal ≥ 0.8× JAX's
speed), and the export time of a ~10M-parameter model.

Models are the Tasks trainkit trains (`build_task` on the task configs): the default CNN (digits, batch 128),
the lm_chars transformer (batch 32 × 64 tokens) and the potential (16 structures × 32 atoms), forward and
forward + forces (-dE/dpositions; TorchScript by autograd inside the module, JAX by `jax.grad`). Each model is
exported the way `trainkit.export` does it (symbolic batch/atoms/seq dims, traced on other sizes than those
timed). Parameters are random (numpy, scaled by fan-in): speed and parity do not need trained weights.

Speed = JAX time ÷ TorchScript time per call (1.0 = as fast as JAX). Rounds alternate JAX and TorchScript;
each side's time per round is the median of its calls, and the figure is the median of the per-round ratios.
Both use their library's default threads on this machine.

    python bench/torchscript_speed.py [--quick]
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

import harness
from harness import Figure, Section

GOAL = 0.8
# The potential's dataset info (reference energies, scales) shapes nothing but constants; fixed values here
# spare the 6 s of EMT labelling that `load_dataset` would spend.
POTENTIAL_INFO = {"species": [28, 29], "energy_ref": [0.2, 0.13], "cutoff": 3.3, "num_atoms": 32,
                  "energy_scale": 0.16, "force_rms": 1.6}


def _task(config_module: str, info: dict[str, Any], model: dict[str, Any] | None = None):
    import importlib

    from trainkit.models import build_task

    config = importlib.import_module(f"configs.{config_module}").get_config()
    if model:
        config.model.update(model)
    return config, build_task(config, info)


def random_params(task) -> Any:
    """Parameters of the task's shapes from numpy (jitting `task.init` would spend seconds compiling threefry)."""
    import jax

    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(task.init, jax.random.key(0))
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(s.shape[0] if s.ndim > 1 else 8))
                        .astype(s.dtype), shapes)


def export(task, params, with_forces: bool):
    from trainkit.export.checkpoint import TRACE_DIMS
    from trainkit.export.torchscript import to_torchscript

    axes = [{i: d for i, d in enumerate(spec.shape) if isinstance(d, str)} for spec in task.inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_torchscript(task.predict, params, task.example_inputs(0, TRACE_DIMS), dynamic_axes=axes,
                              input_names=[s.name for s in task.inputs], with_forces=with_forces)


def _time_pair(jax_fn: Callable[[], Any], torch_fn: Callable[[], Any], rounds: int, calls: int
               ) -> tuple[list[float], list[float]]:
    for fn in (jax_fn, torch_fn):  # warm-up: compilation, TorchScript's profiling runs
        for _ in range(5):
            fn()
    jax_s, torch_s = [], []
    for r in range(rounds):
        order = [(jax_fn, jax_s), (torch_fn, torch_s)]
        for fn, out in order if r % 2 == 0 else order[::-1]:
            out.append(harness.seconds_per_call(fn, calls))
    return jax_s, torch_s


def _case(name: str, task, params, dims: dict[str, int], with_forces: bool, rounds: int, calls: int) -> dict:
    import jax
    import torch

    from trainkit.export.torchscript import parity
    from trainkit.models.potential import energy_and_forces

    module = export(task, params, with_forces)
    inputs = task.example_inputs(1, dims)
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
    params = jax.tree.map(jax.numpy.asarray, params)
    if with_forces:
        jitted = jax.jit(lambda p, *a: energy_and_forces(task.predict, p, *a))

        def torch_fn():
            return module(*tensors)
    else:
        jitted = jax.jit(task.predict)

        def torch_fn():
            with torch.no_grad():
                return module(*tensors)

    def jax_fn():
        return jax.block_until_ready(jitted(params, *inputs))

    jax_s, torch_s = _time_pair(jax_fn, torch_fn, rounds, calls)
    errors = parity(task.predict, params, module, inputs, with_forces=with_forces)
    return {"name": name, "jax_s": jax_s, "torch_s": torch_s, "speed": harness.paired_ratio(jax_s, torch_s),
            "max_rel": errors["max_rel"]}


def export_time(d_model: int, num_layers: int) -> dict[str, float]:
    """Seconds to export the lm_chars transformer scaled up: TorchScript (trace, translate, script, parity
    check, save) and, for scale, StableHLO (`jax.export` + serialize)."""
    import jax

    from trainkit.export.stablehlo import export_stablehlo

    _, task = _task("lm_chars", {"vocab_size": 256, "seq_len": 64},
                    {"d_model": d_model, "num_layers": num_layers, "num_heads": 8})
    params = random_params(task)
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=harness.scratch_dir()) as tmp:
        start = time.perf_counter()
        module = export(task, params, with_forces=False)
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(module, str(Path(tmp) / "model.pt"))
        torchscript_s = time.perf_counter() - start
        start = time.perf_counter()
        jax_params = jax.tree.map(jax.numpy.asarray, params)
        export_stablehlo(lambda *a: task.predict(jax_params, *a), task.inputs, Path(tmp) / "model.stablehlo")
        stablehlo_s = time.perf_counter() - start
    return {"params": count, "torchscript_s": torchscript_s, "stablehlo_s": stablehlo_s}


def run(quick: bool) -> Section:
    import jax
    import torch

    rounds, calls = (3, 10) if quick else (7, 30)
    cnn_config, cnn = _task("default", {"num_classes": 10, "image_shape": (8, 8, 1)})
    lm_config, lm = _task("lm_chars", {"vocab_size": 256, "seq_len": 64})
    pot_config, pot = _task("potential", POTENTIAL_INFO)
    pot_params = random_params(pot)
    cases = [
        _case(f"CNN forward (digits, batch {cnn_config.batch_size})", cnn, random_params(cnn),
              {"batch": cnn_config.batch_size}, False, rounds, calls),
        _case(f"transformer forward (lm_chars, {lm_config.batch_size}×{lm_config.data.seq_len} tokens)", lm,
              random_params(lm), {"batch": lm_config.batch_size, "seq": lm_config.data.seq_len}, False, rounds,
              calls),
        _case(f"potential energy ({pot_config.batch_size}×32 atoms)", pot, pot_params,
              {"batch": pot_config.batch_size, "atoms": 32}, False, rounds, calls),
        _case(f"potential energy + forces ({pot_config.batch_size}×32 atoms)", pot, pot_params,
              {"batch": pot_config.batch_size, "atoms": 32}, True, rounds, calls),
    ]
    size = (256, 3) if quick else (512, 3)
    exported = export_time(*size)
    section = Section("torchscript", "5. TorchScript export: forward speed and parity vs. jax.jit")
    for case in cases:
        section.figures.append(Figure(
            f"{case['name']}: speed, TorchScript ÷ jax.jit", case["speed"], "×", (">=", GOAL),
            f"jax {1e3 * harness.median(case['jax_s']):.2f} ms vs TorchScript "
            f"{1e3 * harness.median(case['torch_s']):.2f} ms per call; parity max_rel {case['max_rel']:.1e}",
            "XLA fuses the whole graph into a few loops; TorchScript runs the translated ops one by one "
            "(its fuser does not run on CPU), so elementwise chains cost a memory pass each. Closing it: map "
            "more chains onto torch's fused native ops in trainkit/export/torch_fusion.py"))
    section.figures.append(Figure(
        f"export time, transformer with {exported['params'] / 1e6:.1f}M parameters (TorchScript)",
        exported["torchscript_s"], "s", None,
        f"StableHLO export of the same model: {exported['stablehlo_s']:.1f} s"))
    section.notes += [
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}. {rounds} alternating rounds × {calls} calls per side.",
        "Parity: max |TorchScript − JAX| ÷ max |JAX| over all outputs (forces included), on the timed inputs, "
        "with JAX at `highest` matmul precision (trainkit.export.torchscript.parity).",
        f"Export time: lm_chars transformer with d_model={size[0]}, {size[1]} layers, 8 heads; to_torchscript "
        "(trace with symbolic dims, translate, torch.jit.script, parity check) + torch.jit.save.",
    ]
    return section


if __name__ == "__main__":
    harness.main(run)
