"""Imports go one way: cli -> quickstart -> {eval, explain, export, serve} -> engine -> {ssl, data, models} -> base.

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
    "quickstart": {"eval", "engine", "models"},
    "cli": {"eval", "explain", "export", "serve", "engine", "ssl", "data", "models", "pretrain", "quickstart"},
    # The base modules import only each other; the package's __init__ is the models facade, __main__ runs the CLI.
    "config": set(), "utils": set(), "_errors": set(), "__init__": {"models"}, "__main__": {"cli"},
}


def _layer(module_path: Path) -> str:
    rel = module_path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py")


def _imported_modules(path: Path) -> set[str]:
    """Dotted names of the ``openmednet`` modules ``path`` imports (function-level imports too)."""
    tree = ast.parse(path.read_text())
    modules = set()
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
        modules.update(name.rstrip(".") for name in names if name.startswith("openmednet."))
    return modules


def _imported_layers(path: Path) -> set[str]:
    return {name.split(".")[1] for name in _imported_modules(path)}


def _modules():
    return sorted(PKG.rglob("*.py"))  # every module: one in no layer fails below instead of being skipped


def test_every_module_is_in_a_layer():
    outside = sorted(str(p.relative_to(PKG)) for p in _modules() if _layer(p) not in ALLOWED)
    assert not outside, f"{outside} belong to no layer: add them to ALLOWED with the layers they may import"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_one_way(path):
    layer = _layer(path)
    bad = {
        other
        for other in _imported_layers(path)
        if other != layer and other not in BASE and other not in ALLOWED[layer]
    }
    assert not bad, f"{path.relative_to(PKG)} ({layer}) imports {sorted(bad)}"


# The training engine knows no task (issue 10): its loop, step and callbacks compose pre-training and
# fine-tuning alike, so they import no task (eval, quickstart, engine.pretrain*) and no objective (ssl).
ENGINE_CORE = ("loop", "callbacks", "trainer", "checkpoint", "distributed", "precision", "optim", "monitor", "plots")
TASKS = ("openmednet.eval", "openmednet.quickstart", "openmednet.cli", "openmednet.ssl",
         "openmednet.engine.pretrain", "openmednet.engine.pretrain_module")


def _task_imports(path: Path) -> list[str]:
    return sorted(m for m in _imported_modules(path) if any(m == t or m.startswith(t + ".") for t in TASKS))


@pytest.mark.parametrize("name", ENGINE_CORE)
def test_engine_core_knows_no_task(name):
    bad = _task_imports(PKG / "engine" / f"{name}.py")
    assert not bad, f"engine/{name}.py imports the task or objective module(s) {bad}"


def test_engine_core_check_sees_a_lazy_task_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from openmednet.eval.finetune import run_finetune\n    import openmednet.engine.pretrainer\n")
    assert _task_imports(probe) == ["openmednet.eval.finetune"]  # a module name, not a string prefix


def test_nothing_imports_cli():
    for path in PKG.rglob("*.py"):
        if _layer(path) in ("cli", "__main__"):
            continue
        assert "cli" not in _imported_layers(path), f"{path.relative_to(PKG)} imports openmednet.cli"


# --------------------------------------------------------------------------------- inside models
def _model_module_imports(path: Path) -> set[str]:
    """``openmednet.models`` submodules that ``path`` imports, function-level imports included."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("openmednet.models."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.ImportFrom) and node.module == "openmednet.models":
            found.update(a.name for a in node.names if (PKG / "models" / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("openmednet.models."))
    return found


def test_models_modules_import_each_other_without_cycles():
    """timm's layering: _registry (names) <- _builder (weights) <- _factory (create_model); no cycle,
    not even one hidden by a function-level import."""
    graph = {p.stem: _model_module_imports(p) - {p.stem} for p in (PKG / "models").glob("*.py") if p.stem != "__init__"}
    assert {"_registry", "_builder", "_factory", "_features", "_timm"} <= graph.keys()
    assert graph["_registry"] <= {"_pretrained"}, "the registry holds names only"
    visiting, done = [], set()

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(node):] + [node])}"
        visiting.append(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep)
        visiting.pop()
        done.add(node)

    for module in sorted(graph):
        visit(module)


_IMPORT_SPY = r"""
import json, os, sys

class Environ(type(os.environ)):
    reads = []
    def __getitem__(self, key):
        Environ.reads.append(key)
        return super().__getitem__(key)

os.environ.__class__ = Environ
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and args and isinstance(args[0], str) else None)

def work():
    return dict(
        env=sorted({k for k in Environ.reads if k.startswith("OPENMEDNET")}),
        cards=sorted({os.path.basename(p) for p in opened if p.endswith(".json") and "weights" in p}),
        timm="timm" in sys.modules,
    )

import openmednet
at_import = work()
openmednet.list_models("mednet_*", pretrained=True)
print(json.dumps(dict(at_import=at_import, at_lookup=work())))
"""


def test_import_openmednet_does_no_work():
    """No model card read, no $OPENMEDNET_* read, no timm import at ``import openmednet``; the
    shipped weights are registered at the first lookup instead (which the spy does see)."""
    import json
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _IMPORT_SPY], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["at_import"] == {"env": [], "cards": [], "timm": False}
    assert seen["at_lookup"]["env"] == ["OPENMEDNET_WEIGHTS_DIR"]
    assert "mednet_gray.sup_cpu64_v1.json" in seen["at_lookup"]["cards"]


def test_segmentation_models_pytorch_is_imported_by_segmentation_work_only():
    """segmentation-models-pytorch (which imports timm: seconds) loads when a U-Net, its loss or
    its metrics are built, not at ``import openmednet``, classification fine-tuning or even
    ``openmednet.eval.segmentation`` (review finding)."""
    import os
    import subprocess
    import sys

    code = ("import sys, openmednet, openmednet.eval.finetune, openmednet.eval.segmentation\n"
            "print('segmentation_models_pytorch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
