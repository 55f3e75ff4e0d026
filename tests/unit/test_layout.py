"""The layout holds: no import cycles among the modules of control_plane/, agent/ and
protocol/, and data flows one way between the layers (imports under `if TYPE_CHECKING:`
aside; they run only for the type checker)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("control_plane", "agent", "protocol")

# What each layer may import, in order from the bottom (a prefix matches a package).
# A module of a layer may import its own layer and those listed.
LAYERS: dict[str, tuple[str, ...]] = {
    "protocol": ("protocol",),
    "agent.worker": ("protocol", "agent.worker", "agent.sdk", "agent.processes", "agent.errors"),
    "agent": ("protocol", "agent"),
    "control_plane.errors": ("control_plane.errors",),
    "control_plane.clock": ("control_plane.clock",),
    "control_plane.model": ("protocol", "control_plane.errors", "control_plane.model"),
    "control_plane.storage": (
        "protocol",
        "control_plane.errors",
        "control_plane.model",
        "control_plane.storage",
    ),
    "control_plane.config": (
        "protocol",
        "control_plane.model",
        "control_plane.storage",
        "control_plane.config",
    ),
    "control_plane.bus": ("protocol", "control_plane.model", "control_plane.storage"),
    "control_plane.waiters": (),
    "control_plane.metrics": ("protocol", "control_plane.model", "control_plane.storage"),
    "control_plane.fleet": (
        "protocol",
        "control_plane.errors",
        "control_plane.clock",
        "control_plane.model",
        "control_plane.storage",
        "control_plane.bus",
        "control_plane.waiters",
        "control_plane.metrics",
        "control_plane.fleet",
    ),
    "control_plane.daemon": (
        "protocol",
        "control_plane.errors",
        "control_plane.clock",
        "control_plane.model",
        "control_plane.storage",
        "control_plane.config",
        "control_plane.bus",
        "control_plane.metrics",
        "control_plane.fleet",
        "control_plane.daemon",
    ),
    "control_plane.http": ("protocol", "control_plane"),
    "control_plane.collector": (),
    "control_plane.cli": ("protocol", "control_plane", "agent.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if path.name != "__main__.py"
    }


def _under_type_checking(tree: ast.Module) -> set[int]:
    """Line numbers of imports inside `if TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def imports_of(path: Path, known: set[str]) -> Iterator[str]:
    """The project modules `path` imports (a name imported from a package that is a
    module of its own counts as that module)."""
    tree = ast.parse(path.read_text())
    skipped = _under_type_checking(tree)
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module in known:
                yield node.module
            for alias in node.names:
                if f"{node.module}.{alias.name}" in known:
                    yield f"{node.module}.{alias.name}"


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: set(imports_of(path, known)) - {name} for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_a_cycle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _layer(module: str) -> str | None:
    matches = [layer for layer in LAYERS if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def _allowed(importer: str, imported: str) -> bool:
    layer = _layer(importer)
    assert layer is not None, f"{importer} belongs to no layer of LAYERS"
    own = imported == layer or imported.startswith(layer + ".")
    return own or any(imported == ok or imported.startswith(ok + ".") for ok in LAYERS[layer])


@pytest.mark.parametrize("package", PACKAGES)
def test_data_flows_one_way(package: str) -> None:
    wrong = sorted(
        f"{importer} imports {imported}"
        for importer, targets in graph().items()
        if importer.split(".")[0] == package
        for imported in targets
        if not _allowed(importer, imported)
    )
    assert wrong == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_folder_of_code_is_a_package(package: str) -> None:
    """setuptools' find_packages (pyproject) leaves a folder without __init__.py out of
    the wheel: an installed control plane would then miss it."""
    missing = sorted(
        str(folder.relative_to(REPO))
        for folder in (REPO / package).rglob("*")
        if folder.is_dir() and any(folder.glob("*.py")) and not (folder / "__init__.py").exists()
    )
    assert missing == []
