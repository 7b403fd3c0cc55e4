"""The package's shape: no module imports another that imports it back, at any depth and
wherever the import sits (a function's lazy import counts too)."""

import ast
from pathlib import Path

import mlpspec

PACKAGE = Path(mlpspec.__file__).parent


def imports_of(file: Path) -> set[str]:
    """The package's modules that `file` imports (relative imports; `from . import x` too)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlpspec."):
            found.add(node.module.split(".")[1])
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, as the modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for other in sorted(graph.get(module, ())):
            if state.get(other) == 1:
                return path[path.index(other):] + [other]
            if other not in state and (found := visit(other)):
                return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_cycle_finder_by_hand():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_one_that_imports_it_back():
    graph = {file.stem: imports_of(file) - {file.stem} for file in PACKAGE.glob("*.py") if file.stem != "__init__"}
    assert "model" in graph["checkpoint"] and "tree" in graph["decode"]  # the reader sees the imports
    assert cycle(graph) is None, " -> ".join(cycle(graph))
