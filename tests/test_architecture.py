"""The package's import map: no cycle, and no module importing one that sits downstream of it.

:data:`LAYERS` is the declared flow (docs/ARCHITECTURE.md draws it): a module may import modules of
earlier layers only, never one of its own layer or of a later one. Every import counts, also those
inside functions (lazy imports) and under ``TYPE_CHECKING``. A new module must be placed here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import chestxray

PACKAGE = Path(chestxray.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    ("errors", "allocator", "provenance", "console"),
    ("decode", "metrics", "storage", "logit_transform"),
    ("sources", "dicomcheck", "conformal", "lineage"),
    ("cache",),
    ("splits", "audit"),
    ("data",),
    ("models",),
    ("runners", "cam"),
    ("ood", "report", "modelcard"),
    ("calibration", "label_free"),
    ("bundle", "config", "drift"),
    ("launch",),
    ("train", "predict", "dicomresult"),
    ("cv", "sweep", "evaluation", "export", "audittrail", "dicomweb", "adapt"),
    ("serve", "quantize", "listen", "worklist", "adapt_unlabeled"),
    ("cli",),
]
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}


def package_imports(path: Path) -> set[str]:
    """The chestxray modules that ``path`` imports (relative or absolute), the package root excluded."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1:
                names = [base] if base else [alias.name for alias in node.names]
            elif base == "chestxray":
                names = [alias.name for alias in node.names]
            elif base.startswith("chestxray."):
                names = [base.split(".")[1]]
            else:
                names = []
            found.update(name.split(".")[0] for name in names)
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("chestxray."))
    return {name for name in found if (PACKAGE / f"{name}.py").is_file()}


def import_graph() -> dict[str, set[str]]:
    return {path.stem: package_imports(path) for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def test_every_module_has_a_place_in_the_flow() -> None:
    modules = set(import_graph())
    assert modules - set(RANK) == set(), "place the new module(s) in LAYERS (and in docs/ARCHITECTURE.md)"
    assert set(RANK) - modules == set(), "LAYERS names module(s) that no longer exist"


def test_imports_point_upstream_only() -> None:
    backward = [f"{module} imports {imported} ({'same layer' if RANK[imported] == RANK[module] else 'downstream'})"
                for module, imports in import_graph().items() for imported in sorted(imports)
                if RANK[imported] >= RANK[module]]
    assert backward == []


def test_there_is_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path + [module, imported]
            if imported not in state and (cycle := visit(imported, path + [module])):
                return cycle
        state[module] = "done"
        return None

    cycles = [cycle for module in graph if module not in state and (cycle := visit(module, []))]
    assert cycles == []


def test_the_walker_sees_relative_absolute_and_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("from .errors import InputError\nfrom chestxray.models import create_model\n"
                      "import chestxray.decode\nfrom . import metrics\nfrom chestxray import __version__\n"
                      "def f():\n    from .predict import load_model\n")
    assert package_imports(source) == {"errors", "models", "decode", "metrics", "predict"}


def test_reading_the_launch_layout_loads_no_torch() -> None:
    code = "import sys, chestxray.launch as l; l.world_size(); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
