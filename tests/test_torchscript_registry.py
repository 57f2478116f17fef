"""The TorchScript converter's structure: one table translates every primitive, and its modules import each other
without cycles, each layer only the layers below it (emitter < rules < fusion < registry < tracing < checks < api <
program < the package)."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import trainkit.export.torchscript as torchscript
from trainkit.errors import TrainkitError
from trainkit.export.torchscript.emitter import Emitter, rule_table
from trainkit.export.torchscript.registry import FUSION_PASSES, RULES
from trainkit.export.torchscript.rules import calls, contraction, control_flow, elementwise, indexing, random, shapes

PACKAGE = torchscript.__name__
# "": the package's __init__
LAYERS = ("emitter", "rules", "fusion", "registry", "tracing", "checks", "api", "program", "")


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    root = Path(torchscript.__file__).parent
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((PACKAGE, *parts))] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], list[str]]:
    """The package's modules that `path` imports (`TYPE_CHECKING` blocks included), and the package imports
    it makes inside functions, as `line: module`."""
    edges, local = set(), []
    tree = ast.parse(path.read_text(), str(path))
    inside_functions = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for node in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import; use absolute ones, which this test reads"
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                edges.add(target)
                if id(node) in inside_functions:
                    local.append(f"{path.name}:{node.lineno}: {target}")
    return edges, local


def _layer(module: str) -> int:
    return LAYERS.index(module[len(PACKAGE) + 1:].split(".")[0])


def test_the_converter_imports_form_no_cycle_and_each_layer_imports_only_lower_ones():
    modules = _modules()
    graph, local = {}, []
    for name, path in modules.items():
        graph[name], found = _imports(path, modules)
        local += found
    assert not local, f"imports of the converter inside functions (move the shared piece down a layer): {local}"
    assert {"emitter", "rules.calls", "fusion.graph", "registry", "api"} <= {m[len(PACKAGE) + 1:] for m in graph}
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if _layer(b) > _layer(a)]
    assert not upward, f"imports of a higher layer: {upward}"

    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            cycle = path[path.index(module):] + (module,)
            pytest.fail("import cycle: " + " -> ".join(m[len(PACKAGE) + 1:] or "__init__" for m in cycle))
        if module not in done:
            for target in sorted(graph[module]):
                visit(target, path + (module,))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_every_primitive_has_exactly_one_rule_and_every_rule_is_callable():
    tables = [elementwise.RULES, shapes.RULES, contraction.RULES, indexing.RULES, calls.RULES, control_flow.RULES,
              random.RULES]
    assert sum(len(t) for t in tables) == len(RULES)  # no name is in two tables
    assert all(callable(rule) for rule in RULES.values())
    assert {"pjit", "closed_call", "custom_jvp_call", "cond", "while", "scan", "add", "dot_general", "gather"} <= set(
        RULES)
    assert all(callable(m) for fusion_pass in FUSION_PASSES for matchers in fusion_pass.values() for m in matchers)
    with pytest.raises(TypeError):
        RULES["add"] = RULES["sub"]  # the table is read-only: no module adds to it as a side effect


def test_a_primitive_named_in_two_rule_tables_is_an_error():
    def first(g, eqn, ins):
        return ins

    def second(g, eqn, ins):
        return ins

    assert rule_table({"add": first}, {"sub": second}) == {"add": first, "sub": second}
    with pytest.raises(ValueError, match=r"primitive 'add' has two translation rules: .*first and .*second"):
        rule_table({"add": first}, {"sub": second, "add": second})


def test_the_emitter_translates_only_what_its_table_lists():
    # jit is translated by the table like any primitive: an empty table supports nothing, not even calls
    closed = jax.make_jaxpr(lambda x: jax.jit(jnp.sin)(x))(1.0)
    with pytest.raises(TrainkitError, match=r"primitive '(jit|pjit)' .* is not supported \(also unsupported here: "
                                            r"sin\)"):
        Emitter({}).check_supported(closed.jaxpr)
    Emitter(RULES).check_supported(closed.jaxpr)
