"""Generate docs/export_coverage.md: every JAX primitive reachable from `jax.lax` and friends, whether the
TorchScript converter supports it, and which test files export it (issue #14 item 3).

    python tests/export_coverage.py          # (re)write docs/export_coverage.md
    python tests/export_coverage.py --check  # exit 1 if the committed file differs from what would be written

Primitives: every `jax._src.core.Primitive` found as a module attribute of the modules under `jax._src.lax`,
`jax._src.interpreters` and `jax._src.random` (walked with pkgutil; modules that fail to import are skipped) and of
`FRIENDS` below (PRNG, custom derivatives, jit, checkpoint, callbacks, shape polymorphism, ...), deduplicated by
name. Rule names that this JAX does not define as primitives (aliases for other JAX versions) are listed apart.

Status comes from the converter's own tables: "supported" = a rule in `registry.RULES`; "constant inputs only" =
`emitter.CONSTANT_PRIMITIVES`; anything else is exported only when all its inputs are constants
(`emitter._foldable`), which the table does not count as support.

"Tested by" is found by tracing what the tests export, the way the exporter traces it (`jax.make_jaxpr` with the
dynamic axes symbolic, dead code removed, `tracing.with_jax_forces` for with_forces exports) and collecting primitive
names recursively through sub-jaxprs (`core.jaxprs_in_params`):
- tests/test_torchscript_ops.py: its tables (`GRADIENT_FNS` through `_all_fns`, every `OP_GROUPS` entry) and the
  models of its other tests (`Convs`, `FusedBlock`, the custom_vjp lambda);
- tests/corpus (tests/test_corpus.py): every float32 case from `corpus.case_ids()` / `corpus.build(id)`;
- tests/test_torchscript_trust.py and tests/test_torchscript_fusion.py have no tables: `_trust_exports` and
  `_fusion_exports` below list, by hand from reading those files, the functions their tests export
  (refusal tests, whose export is meant to fail, are left out). Keep them in step when those tests change.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import pkgutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
OUTPUT = ROOT / "docs" / "export_coverage.md"
sys.path[:0] = [p for p in (str(TESTS), str(ROOT)) if p not in sys.path]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax._src import core  # noqa: E402
from jax._src.interpreters import partial_eval as pe  # noqa: E402

from trainkit.export.torchscript import tracing  # noqa: E402
from trainkit.export.torchscript.emitter import CONSTANT_PRIMITIVES  # noqa: E402
from trainkit.export.torchscript.registry import RULES  # noqa: E402

WALKED = ("jax._src.lax", "jax._src.interpreters", "jax._src.random")
FRIENDS = ("jax._src.prng", "jax._src.custom_derivatives", "jax._src.pjit", "jax._src.ad_util",
           "jax._src.ad_checkpoint", "jax._src.core", "jax._src.dispatch", "jax._src.custom_batching",
           "jax._src.export.shape_poly", "jax._src.callback", "jax._src.debugging", "jax._src.shard_map")

# Why a primitive is not supported, where one reason is obvious: (predicate on name and module, note).
NOTES: tuple[tuple[Callable[[str, str], bool], str], ...] = (
    (lambda n, m: m == "lax.parallel", "collective: n/a on one device"),
    (lambda n, m: n in ("shard_map", "reshard", "sharding_constraint", "layout_constraint", "inspect_sharding"),
     "sharding: n/a on one device"),
    (lambda n, m: m in ("callback", "debugging"), "host callback (Python)"),
    (lambda n, m: m == "lax.linalg", "linear algebra (jnp.linalg, jax.scipy.linalg)"),
    (lambda n, m: m == "lax.fft", "complex-valued (jnp.fft)"),
    (lambda n, m: n in ("complex", "real", "imag", "conj"), "complex numbers"),
    (lambda n, m: m == "lax.special" or n in ("polygamma", "zeta"), "special function"),
    (lambda n, m: n in ("select_and_scatter_add", "select_and_gather_add"),
     "derivative of max/min pooling (reduce_window_max)"),
    (lambda n, m: n.startswith("rng_") or n in ("random_gamma", "random_clone"), "random sampling"),
    (lambda n, m: n in ("philox2x32", "philox4x32", "threefry4x32"), "non-default PRNG implementation"),
    (lambda n, m: n.endswith("_ref") or n in ("freeze",), "mutable refs"),
    (lambda n, m: n in ("after_all", "create_token"), "tokens (side effects)"),
    (lambda n, m: m == "export.shape_poly", "shape polymorphism"),
)


def _modules() -> Iterator[str]:
    for name in WALKED:
        try:
            package = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this JAX lacks or cannot import is skipped
            continue
        yield name
        for info in pkgutil.walk_packages(getattr(package, "__path__", []), name + ".", onerror=lambda _: None):
            yield info.name
    yield from FRIENDS


def _assigned(module: Any) -> set[str]:
    """Names that `module`'s source assigns (where a primitive is defined, not imported)."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return set()
    return {t.id for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}


def jax_primitives() -> dict[str, str]:
    """Primitive name -> the module that defines it (the first in walk order that assigns it, else the first
    that holds it), without the `jax._src.` prefix."""
    holders: dict[str, list[tuple[bool, str]]] = {}
    for name in _modules():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # noqa: BLE001
            continue
        assigned = None
        for attr, value in list(vars(module).items()):
            if isinstance(value, core.Primitive):
                assigned = _assigned(module) if assigned is None else assigned
                holders.setdefault(value.name, []).append((attr in assigned, name.removeprefix("jax._src.")))
    return {name: next((m for a, m in found if a), found[0][1]) for name, found in sorted(holders.items())}


def primitives_of(jaxpr: core.Jaxpr, into: set[str]) -> set[str]:
    for eqn in jaxpr.eqns:
        into.add(eqn.primitive.name)
        for sub in core.jaxprs_in_params(eqn.params):
            primitives_of(sub, into)
    return into


def trace(fn: Callable[..., Any], params: Any, args: tuple, dynamic_axes: list | None = None,
          with_forces: bool = False, dim_constraints: tuple[str, ...] = ()) -> set[str]:
    """The primitives of what `to_torchscript(fn, params, args, dynamic_axes=..., with_forces=...)` translates:
    traced with the dynamic axes symbolic, dead code removed."""
    args = tuple(np.asarray(a) for a in args)
    axes = list(dynamic_axes or [None] * len(args))
    symbols = list(dict.fromkeys(s for spec in axes if spec for s in spec.values()))
    dims = {}
    if symbols:
        used = [c for c in dim_constraints if any(s in c for s in symbols)]
        dims = dict(zip(symbols, jax.export.symbolic_shape(", ".join(symbols), constraints=used)))
    specs = [jax.ShapeDtypeStruct(tuple(dims[spec[i]] if spec and i in spec else d for i, d in enumerate(a.shape)),
                                  a.dtype) for a, spec in zip(args, axes)]
    closed = jax.make_jaxpr(tracing.with_jax_forces(fn) if with_forces else fn)(params, *specs)
    jaxpr, _ = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True)
    return primitives_of(jaxpr, set())


def _random_params(model: Any, *example: Any, scale: float = 1.0) -> Any:
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *example)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * scale).astype(s.dtype), shapes)


def _ops_exports() -> Iterator[tuple]:
    ops = importlib.import_module("test_torchscript_ops")
    example = np.tile(ops.KINKS, (1, len(ops.GRADIENT_FNS)))
    yield ops._all_fns, {}, (example,), [{0: "batch"}]
    yield (lambda p, x: ops.clip_gradient(x) * 3.0), {}, (ops.KINKS,), None
    p = np.ones((2, 3), np.float32)
    group_args = (np.ones((5, 3), np.float32), np.arange(5, dtype=np.int32) % 4, np.array(1, np.int32))
    for fn in ops.OP_GROUPS.values():
        yield fn, p, group_args, [{0: "batch"}, {0: "batch"}, None]
    for model, x in ((ops.Convs(), np.ones((2, 9, 9, 2), np.float32)), (ops.FusedBlock(), np.ones((3, 6), np.float32))):
        yield model.apply, _random_params(model, x), (x,), [{0: "batch"}]


def _corpus_exports() -> Iterator[tuple]:
    corpus = importlib.import_module("corpus")
    for case_id in corpus.case_ids():
        if case_id.endswith("-f32"):
            c = corpus.build(case_id)
            yield c.fn, c.params, c.args1, c.dynamic_axes, c.with_forces, tuple(c.dim_constraints)


def _trust_exports() -> Iterator[tuple]:
    """What tests/test_torchscript_trust.py exports (read from the file; refusal tests left out)."""
    import flax.linen as nn
    import jax.numpy as jnp
    from flax import nnx
    trust = importlib.import_module("test_torchscript_trust")
    lj = {"sigma": np.float32(1.0), "box": np.float32(3.6)}
    positions = trust._positions(8, np.float32)
    yield trust.lennard_jones, lj, (positions,), [{0: "atoms"}], True
    yield trust.lennard_jones, lj, (positions,), [{0: "atoms"}]
    x = np.ones((5, 4), np.float32)
    yield (lambda p, v: jnp.tanh(v @ p) - 1.0 + 1e-7 * v[:, :3]), np.ones((4, 3), np.float32), (x,), [{0: "b"}]
    x = np.ones((2, 5, 3), np.float32)
    for model in (nn.RNN(nn.LSTMCell(8)), nn.Bidirectional(nn.RNN(nn.GRUCell(4)), nn.RNN(nn.GRUCell(4)))):
        yield model.apply, model.init(jax.random.key(0), x), (x,), [{0: "b", 1: "t"}]

    class Block(nnx.Module):  # test_nnx_module_in_eval_mode_exports_with_its_rng_state
        def __init__(self, rngs: nnx.Rngs):
            self.linear = nnx.Linear(3, 6, rngs=rngs)
            self.norm = nnx.BatchNorm(6, rngs=rngs)
            self.drop = nnx.Dropout(0.3, rngs=rngs)

        def __call__(self, v):
            return self.drop(nnx.relu(self.norm(self.linear(v))))

    block = Block(nnx.Rngs(0))
    block.eval()
    graphdef, state = nnx.split(block)
    yield (lambda s, v: nnx.merge(graphdef, s)(v)), state, (np.ones((4, 3), np.float32),), [{0: "b"}]
    table = np.ones((64, 4), np.float32)
    yield (lambda p, v: v + p[None, : v.shape[1], :]), table, (np.ones((2, 7, 4), np.float32),), \
        [{0: "b", 1: "seq"}], False, ("seq <= 64",)
    yield (lambda p, c: jnp.diagonal(c) * p), np.float32(2.0), (np.eye(3, dtype=np.float32),)
    yield (lambda p, v: v * p), np.float32(3.0), (np.ones((4, 2), np.float32),), [{0: "n"}]


def _fusion_exports() -> Iterator[tuple]:
    """What tests/test_torchscript_fusion.py exports (read from the file)."""
    fusion = importlib.import_module("test_torchscript_fusion")
    images = np.ones((2, 9, 8, 3), np.float32)
    yield fusion.Pools().apply, _random_params(fusion.Pools(), images), (images,), [{0: "batch"}]
    images = np.ones((2, 6, 6, 2), np.float32)
    params = _random_params(fusion.ConvRelu(), images)
    yield fusion.ConvRelu().apply, params, (images,), [{0: "batch"}]
    yield fusion.ConvRelu().apply, params, (images,), [{0: "batch"}], True
    x, keep = np.ones((2, 5, 6), np.float32), np.ones((2, 5), np.int32)
    yield (fusion.MaskedAttention().apply, _random_params(fusion.MaskedAttention(), x, keep), (x, keep),
           [{0: "batch", 1: "seq"}] * 2)
    attention = fusion.CausalSelfAttention(num_heads=4)
    x = np.ones((2, 6, 16), np.float32)
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                          jax.eval_shape(lambda k: attention.init(k, x, False), jax.random.PRNGKey(0)))
    yield (lambda p, v: attention.apply(p, v, False)), params, (x,), [{0: "batch", 1: "seq"}]
    x = np.ones((2, 3, 4), np.float32)
    params = _random_params(fusion.DenseActivations(), x)
    yield fusion.DenseActivations().apply, params, (x,), [{0: "batch"}]
    yield fusion.DenseActivations().apply, params, (x,), [{0: "batch"}], True
    task = fusion.lm_task(fusion.DecoderLM(vocab_size=11, max_len=16, d_model=16, num_heads=2, num_layers=2))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(task.init, jax.random.PRNGKey(0)))
    yield task.predict, params, task.example_inputs(0, {"batch": 2, "seq": 5}), [{0: "batch", 1: "seq"}]


SOURCES: dict[str, Callable[[], Iterator[tuple]]] = {
    "tests/test_torchscript_ops.py": _ops_exports,
    "tests/test_corpus.py": _corpus_exports,
    "tests/test_torchscript_trust.py": _trust_exports,
    "tests/test_torchscript_fusion.py": _fusion_exports,
}


def tested_by() -> dict[str, list[str]]:
    """Primitive name -> the test files (sorted) whose exports contain it."""
    result: dict[str, set[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for test_file, exports in SOURCES.items():
            start = time.perf_counter()
            for export in exports():
                for name in trace(*export):
                    result.setdefault(name, set()).add(test_file)
            if os.environ.get("EXPORT_COVERAGE_TIMES"):
                print(f"{test_file}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return {name: sorted(files) for name, files in sorted(result.items())}


def _status(name: str) -> str:
    if name in CONSTANT_PRIMITIVES:
        return "constant inputs only"
    return "supported" if name in RULES else "**not supported**"


def _note(name: str, module: str) -> str:
    if name in RULES or name in CONSTANT_PRIMITIVES:
        return ""
    return next((note for applies, note in NOTES if applies(name, module)), "")


def render() -> str:
    primitives = jax_primitives()
    tests = tested_by()
    supported = [n for n in primitives if n in RULES and n not in CONSTANT_PRIMITIVES]
    constant = [n for n in primitives if n in CONSTANT_PRIMITIVES]
    tested = [n for n in supported + constant if n in tests]
    untested = [n for n in supported + constant if n not in tests]
    lines = [
        "# TorchScript export coverage",
        "",
        "<!-- Generated by `python tests/export_coverage.py`; do not edit. tests/test_export_coverage.py fails when",
        "     this file is stale (regenerate it after adding a rule or a test). -->",
        "",
        f"Every JAX primitive that jax {jax.__version__} defines in `jax._src.lax` and its neighbours (PRNG, custom "
        "derivatives, jit, checkpoint, callbacks, shape polymorphism, interpreters), with its status in the "
        "converter's own tables (`trainkit/export/torchscript/registry.py` `RULES`, and "
        "`emitter.CONSTANT_PRIMITIVES` for those translated only when their inputs are constants) and the test "
        "files whose exports contain it, found by tracing what those tests export (see the docstring of "
        "tests/export_coverage.py for the list).",
        "",
        f"**Supported: {len(supported)} of {len(primitives)} primitives**, plus {len(constant)} for constant "
        f"inputs only. **Tested: {len(tested)} of those {len(supported) + len(constant)}.** A primitive that is "
        "not supported is still exported when all its inputs are constants (JAX evaluates it at export and the "
        "value is embedded); a rule may also refuse some parameters of a supported primitive with a "
        "`TrainkitError` that names them.",
        "",
        "| primitive | defined in | status | tested by | note |",
        "|---|---|---|---|---|",
    ]
    for name, module in primitives.items():
        files = ", ".join(Path(f).name for f in tests.get(name, []))
        lines.append(f"| `{name}` | `{module}` | {_status(name)} | {files} | {_note(name, module)} |")
    extra = sorted(set(RULES) - set(primitives))
    if extra:
        lines += ["", f"Rules for names jax {jax.__version__} does not define as primitives (the names of other JAX "
                  f"versions), all supported: {', '.join(f'`{n}`' for n in extra)}."]
    if untested:
        lines += ["", f"Supported but exercised by none of these tests: {', '.join(f'`{n}`' for n in untested)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {OUTPUT.relative_to(ROOT)} is stale")
    options = parser.parse_args(argv)
    start = time.perf_counter()
    text = render()
    seconds = time.perf_counter() - start
    if options.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run `python tests/export_coverage.py`", file=sys.stderr)
            return 1
        print(f"{OUTPUT.relative_to(ROOT)} is current ({seconds:.1f} s)")
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
