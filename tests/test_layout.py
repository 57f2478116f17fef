"""The package layout is the architecture: imports go down the layers, never up, and never in a circle.

Layers, lowest first (a module may import its own layer and those below it):
  0  errors, paths                                   (no trainkit imports at all)
  1  config, sharding, distributed, preemption, train_state, nonfinite, compilation_cache, workdir,
     export.formats (the formats table)
  2  checkpoints/, data/, models/
  3  logging/                                        (metrics, progress, W&B)
  4  export/                                         (the exporters and the TorchScript converter)
  5  train                                           (the loop)
  6  the commands: main, ckpt, plot, launch, cli, ase, export.__main__
Function-local imports count too (a local import must not dodge a cycle); `if TYPE_CHECKING:` blocks do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

LAYERS = [  # (module or package, layer); the first match wins, so more specific names come first
    ("trainkit.errors", 0), ("trainkit.paths", 0),
    ("trainkit.export.formats", 1), ("trainkit.config", 1), ("trainkit.sharding", 1), ("trainkit.distributed", 1),
    ("trainkit.preemption", 1), ("trainkit.train_state", 1), ("trainkit.workdir", 1), ("trainkit.nonfinite", 1),
    ("trainkit.compilation_cache", 1),
    ("trainkit.checkpoints", 2), ("trainkit.data", 2), ("trainkit.models", 2),
    ("trainkit.logging", 3),
    ("trainkit.export.__main__", 6), ("trainkit.export", 4),
    ("trainkit.train", 5),
    ("trainkit.main", 6), ("trainkit.ckpt", 6), ("trainkit.plot", 6), ("trainkit.launch", 6), ("trainkit.cli", 6),
    ("trainkit.ase", 6), ("trainkit", 6),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((ROOT / "trainkit").rglob("*.py"))}


def runtime_imports(path: Path) -> set[str]:
    """The trainkit modules `path` imports anywhere (functions included), outside `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {owning_module(name) for name in found if name.startswith("trainkit")}


def owning_module(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def layer(module: str) -> int:
    return next(rank for prefix, rank in LAYERS if module == prefix or module.startswith(prefix + "."))


GRAPH = {m: runtime_imports(p) - {m} for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)  # raises StopIteration for a module that no layer names


def test_imports_never_go_up_a_layer():
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in GRAPH.items() for d in sorted(deps) if layer(d) > layer(m)]
    assert not upward, "\n".join(upward)


def test_imports_form_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(GRAPH[module]):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path[path.index(dep):] + [dep])
            if dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


def test_the_bottom_layer_imports_nothing_of_trainkit():
    for module in ("trainkit.errors", "trainkit.paths"):
        assert not GRAPH[module], f"{module} imports {GRAPH[module]}"


def test_the_checker_sees_function_local_imports():
    """A local import is an import: the checker must see one (here, the command modules' lazy imports)."""
    assert "trainkit.checkpoints.sources" in GRAPH["trainkit.ckpt"]
    assert "trainkit.train" in GRAPH["trainkit.main"]
