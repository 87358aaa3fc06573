"""Imports go one way: cli -> {eval, explain, export, serve} -> engine -> {ssl, data, models} -> base.

``models`` and ``data`` never import each other, and nothing imports ``cli``. Checked statically
from the source (absolute ``openmednet.*`` imports and relative imports), so a lazy import inside a
function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "openmednet"

# layer -> layers it may import (besides itself and the base modules)
BASE = {"config", "utils", "_errors", "__init__", "__main__"}
ALLOWED = {
    "models": set(),
    "data": set(),
    "ssl": {"models"},
    "engine": {"ssl", "data", "models"},
    "eval": {"engine", "ssl", "data", "models"},
    "explain": {"engine", "data", "models"},
    "export": {"engine", "data", "models"},
    "serve": {"explain", "export", "engine", "data", "models", "eval"},
    "cli": {"eval", "explain", "export", "serve", "engine", "ssl", "data", "models", "pretrain", "quickstart"},
}


def _layer(module_path: Path) -> str:
    rel = module_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_layers(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    layers = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                base = path.relative_to(PKG).parent.parts[: len(path.relative_to(PKG).parent.parts) - node.level + 1]
                names = [".".join(("openmednet", *base, node.module or ""))]
            elif node.module:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "openmednet" and len(parts) > 1 and parts[1]:
                layers.add(parts[1])
    return layers


def _modules():
    return sorted(p for p in PKG.rglob("*.py") if _layer(p) in ALLOWED)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_one_way(path):
    layer = _layer(path)
    bad = {
        other
        for other in _imported_layers(path)
        if other != layer and other not in BASE and other not in ALLOWED[layer]
    }
    assert not bad, f"{path.relative_to(PKG)} ({layer}) imports {sorted(bad)}"


def test_nothing_imports_cli():
    for path in PKG.rglob("*.py"):
        if _layer(path) in ("cli", "__main__"):
            continue
        assert "cli" not in _imported_layers(path), f"{path.relative_to(PKG)} imports openmednet.cli"
