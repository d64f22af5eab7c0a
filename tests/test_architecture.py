"""The package's shape, read with ast: no import cycle, no private name used across modules.

`python -m tests.test_architecture` prints the import graph and the largest classes and
functions (docs/architecture.md).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "smolcluster"
MAX_CLASS_LINES = 250
# Public API despite the underscore: namedtuple methods (urllib's parse results have them) and
# os._exit, the documented way to end a process without interpreter cleanup.
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make", "_exit"}


def modules() -> dict[str, ast.Module]:
    """smolcluster's modules by short name (`server`, `sync`, ...), parsed."""
    return {
        path.stem: ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.glob("*.py"))
    }


def _imported(node: ast.AST) -> list[tuple[str, list[str]]]:
    """(smolcluster module, names taken from it) for one import statement, anywhere."""
    if isinstance(node, ast.Import):
        return [(a.name.split(".")[1], []) for a in node.names if a.name.startswith("smolcluster.")]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [a.name for a in node.names]
        if node.module == "smolcluster":  # from smolcluster import quantize
            return [(name, []) for name in names]
        if node.module.startswith("smolcluster."):
            return [(node.module.split(".")[1], names)]
    return []


def import_graph(parsed: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the package modules it imports: top level, inside functions or TYPE_CHECKING
    alike, so an import moved into a function cannot hide a cycle."""
    return {
        name: {
            target
            for node in ast.walk(tree)
            for target, _ in _imported(node)
            if target in parsed and target != name
        }
        for name, tree in parsed.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every module that can reach itself, as one path back to it."""
    found = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.append([*path, start])
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in PUBLIC_UNDERSCORED


def _own_names(tree: ast.Module) -> set[str]:
    """Every name a module defines: functions, classes, assignments, `self.x` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


def private_crossings(parsed: dict[str, ast.Module]) -> list[str]:
    """Private names one module takes from another: imported by name, or read as an attribute
    (`server._wait_for_rejoin()`, `quantize._blocks`) that the reading module does not define."""
    found = []
    for name, tree in parsed.items():
        own = _own_names(tree)
        for node in ast.walk(tree):
            for target, names in _imported(node):
                found += [f"{name}: from {target} import {n}" for n in names if _private(n)]
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                found.append(f"{name}:{node.lineno}: .{node.attr} is not defined in {name}")
    return found


def sizes(parsed: dict[str, ast.Module]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(lines, qualified name) of every class and every function, largest first."""
    classes, functions = [], []
    for name, tree in parsed.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes.append((node.end_lineno - node.lineno + 1, f"{name}.{node.name}"))
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        lines = item.end_lineno - item.lineno + 1
                        functions.append((lines, f"{name}.{node.name}.{item.name}"))
        for item in tree.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.append((item.end_lineno - item.lineno + 1, f"{name}.{item.name}"))
    return sorted(classes, reverse=True), sorted(functions, reverse=True)


def test_no_import_cycle() -> None:
    graph = import_graph(modules())
    assert {"server", "worker", "hub", "sync", "elastic"} <= set(graph)
    assert "server" not in graph["elastic"] and "server" not in graph["sync"]
    assert cycles(graph) == [], "\n" + render(graph)


def test_no_private_name_crosses_a_module() -> None:
    assert private_crossings(modules()) == []


def test_no_class_over_the_limit() -> None:
    classes, _ = sizes(modules())
    assert [c for c in classes if c[0] > MAX_CLASS_LINES] == []


def test_the_checks_catch_what_they_look_for() -> None:
    """The checks find a cycle hidden in a function and a private name read across modules."""
    parsed = {
        "a": ast.parse("import smolcluster.b\ndef f(x):\n    return x._hidden()\n"),
        "b": ast.parse("def g():\n    from smolcluster.a import _helper\n"),
    }
    assert cycles(import_graph(parsed)) == [["a", "b", "a"], ["b", "a", "b"]]
    assert private_crossings(parsed) == [
        "a:3: ._hidden is not defined in a",
        "b: from a import _helper",
    ]


def render(graph: dict[str, set[str]]) -> str:
    return "\n".join(f"{name} -> {', '.join(sorted(graph[name])) or '-'}" for name in sorted(graph))


def main() -> int:
    parsed = modules()
    graph = import_graph(parsed)
    classes, functions = sizes(parsed)
    print(f"{len(parsed)} modules, {sum(len(g) for g in graph.values())} imports between them")
    print(render(graph))
    print("cycles:", cycles(graph) or "none")
    print("private names across modules:", private_crossings(parsed) or "none")
    print("largest classes:", ", ".join(f"{n} {lines}" for lines, n in classes[:5]))
    print("largest functions:", ", ".join(f"{n} {lines}" for lines, n in functions[:5]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
