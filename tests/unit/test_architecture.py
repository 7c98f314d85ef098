"""The rules of the code's shape, kept by a test: the core (the repository's firehose/ folder)
imports nothing from transforms/ or destinations/ except through the registry; no function of
the core is above cyclomatic complexity 20 (radon rank C); no module of the three packages is
above 800 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from radon.complexity import cc_visit

REPO = Path(__file__).resolve().parents[2]
CORE = REPO / "firehose"
PACKAGES = [REPO / "firehose", REPO / "transforms", REPO / "destinations"]


def _modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _runtime_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports that run (those under ``if TYPE_CHECKING:`` are for type checkers only)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
    return out


def test_the_core_imports_no_plugin_module() -> None:
    bad = [f"{path.relative_to(REPO)}:{line}: {module}"
           for path in _modules(CORE)
           for line, module in _runtime_imports(ast.parse(path.read_text()))
           if module.startswith(("firehose.transforms", "firehose.destinations", "transforms", "destinations"))]
    assert bad == [], "the core reaches plugins only through firehose.registry:\n" + "\n".join(bad)


def test_no_function_of_the_core_is_above_complexity_20() -> None:
    too_complex = [f"{path.relative_to(REPO)}:{block.lineno}: {block.fullname} ({block.complexity})"
                   for path in _modules(CORE) for block in cc_visit(path.read_text()) if block.complexity > 20]
    assert too_complex == []


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_no_module_is_above_800_lines(package: Path) -> None:
    long = [f"{p.relative_to(REPO)}: {n}" for p in _modules(package)
            if (n := len(p.read_text().splitlines())) > 800]
    assert long == []
