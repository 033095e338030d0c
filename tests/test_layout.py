"""The package's layout, read from its source with ast: no import cycle, the template core (model, data, module)
knows nothing of the lecture kit, the speed add-on or the CLI, diagnostics/ imports nothing else of the package,
and only the fit path (speedswitch.py) imports the speed add-on. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mm_lightning"
CORE = ("mm_lightning.model", "mm_lightning.data", "mm_lightning.module")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from pkg import submodule` names the submodule)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .a import b
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # `from pkg import sub` imports the submodule; `from pkg import name`, the package (its __init__)
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names}
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "mm_lightning.lecture.fold" in graph["mm_lightning.cli"]  # (inside fold_batchnorm_command)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_core_knows_nothing_of_the_lecture_kit_speed_or_cli():
    graph = import_graph()
    for core in CORE:
        banned = [
            t for t in graph[core] if t.startswith(("mm_lightning.lecture", "mm_lightning.speed", "mm_lightning.cli"))
        ]
        assert not banned, f"{core} imports {banned}"


def test_diagnostics_import_nothing_else_of_the_package():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("mm_lightning.diagnostics"):
            outside = [t for t in targets if not t.startswith("mm_lightning.diagnostics")]
            assert not outside, f"{name} imports {outside}"


def test_only_the_fit_path_imports_the_speed_add_on():
    graph = import_graph()

    def in_speed(name: str) -> bool:
        return name == "mm_lightning.speed" or name.startswith("mm_lightning.speed.")

    importers = {n for n, ts in graph.items() if not in_speed(n) and any(in_speed(t) for t in ts)}
    assert importers == {"mm_lightning.speedswitch"}, importers
