"""The package layering of CONTRIBUTING.md holds: every module imports, no import cycle, no lower layer
importing a higher one (imports inside functions count too)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import moeguard

PACKAGE = Path(moeguard.__file__).parent
CONTRIBUTING = PACKAGE.parents[1] / "CONTRIBUTING.md"


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``), ``__main__`` scripts left out."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["moeguard", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__main__":
            continue
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The moeguard modules ``name`` imports anywhere in its source (``from pkg import submodule`` included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def layers() -> list[set[str]]:
    """The layering line of CONTRIBUTING.md (``a, b < c < ...``), lowest first."""
    line = next(line for line in CONTRIBUTING.read_text().splitlines() if re.match(r"\s+errors\b.* < .*\bcli\s*$", line))
    return [{name.strip() for name in rank.split(",")} for rank in line.split("<")]


def layer_of(module: str) -> str:
    """A module's layer: its top-level package or module under moeguard (``moeguard`` for the root package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "moeguard"


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_imports():
    for name in modules():
        importlib.import_module(name)


def test_every_package_and_top_level_module_has_a_place_in_the_layering():
    placed = set().union(*layers())
    missing = sorted({layer_of(name) for name in GRAPH} - placed - {"moeguard"})
    assert not missing, f"add {missing} to the layering line of CONTRIBUTING.md"


def test_no_lower_layer_imports_a_higher_one_or_its_neighbour():
    rank = {name: position for position, names in enumerate(layers()) for name in names}
    rank["moeguard"] = rank["errors"] + 0.5  # the root package re-exports the errors and gives the version
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if layer_of(module) != layer_of(target) and rank[layer_of(target)] >= rank[layer_of(module)]
    )
    assert not wrong, "imports against the layering of CONTRIBUTING.md:\n" + "\n".join(wrong)


def test_there_is_no_import_cycle():
    cycles = strongly_connected(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return components


def test_the_checks_find_a_cycle_and_a_layering_violation():
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}]
    assert layer_of("moeguard.pruning.sweep") == "pruning" and layer_of("moeguard") == "moeguard"
