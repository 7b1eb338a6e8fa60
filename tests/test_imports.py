"""The import order that docs/architecture.md documents is the real one, and has no cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"
SUBPACKAGES = ("sim", "bench")  # each counted as one unit, named with its slash


def unit_of(parts: list[str]) -> str:
    """``["sim", "server"]`` is ``sim/``; ``["forward"]`` is ``forward``."""
    return f"{parts[0]}/" if parts[0] in SUBPACKAGES else parts[-1]


def imported_units(path: Path) -> set[str]:
    """The proxy's modules that ``path`` imports, anywhere in it (TYPE_CHECKING too)."""
    package = list(path.relative_to(PACKAGE).parts[:-1])
    units: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module is not None:
                units.add(unit_of([*base, *node.module.split(".")]))
            else:
                units.update(unit_of([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "proxy" and len(parts) > 1:
                    units.add(unit_of(parts[1:]))
    return units


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts == ["__init__"]:
            continue
        unit = unit_of(parts)
        graph.setdefault(unit, set()).update(imported_units(path) - {unit})
    return graph


def documented_order() -> list[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    match = re.search(r"Imports flow one way.*?:(.*?)\.\n", text, re.DOTALL)
    assert match, "docs/architecture.md states no import order"
    return re.findall(r"`([^`]+)`", match[1])


def test_every_module_imports_only_those_documented_before_it() -> None:
    order = documented_order()
    graph = import_graph()
    assert sorted(order) == sorted(graph)  # every module named, and only modules
    late = {
        unit: sorted(d for d in deps if order.index(d) > order.index(unit))
        for unit, deps in graph.items()
    }
    assert {unit: deps for unit, deps in late.items() if deps} == {}


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "pool" in graph["exchange"]  # from .pool import
    assert "sim/" in graph["__main__"]  # a lazy import inside a function
    assert "models" in graph["sim/"]  # from ..models import, inside the subpackage
    assert "app" not in graph["admin"]  # it was, under TYPE_CHECKING
