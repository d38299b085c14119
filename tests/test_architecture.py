"""The package's import map: no cycle, and no module importing one that sits downstream of it.

:data:`LAYERS` is the declared flow (docs/ARCHITECTURE.md draws it), over dotted module names below
``chestxray``: a module may import modules of earlier layers only, never one of its own layer or of a
later one. Every import counts, also those inside functions (lazy imports) and under
``TYPE_CHECKING``. :data:`PACKAGES` orders the subpackages: a subpackage's modules import only
modules of earlier subpackages (or the root modules that come before them). A new module must be
placed in LAYERS and named in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import chestxray

PACKAGE = Path(chestxray.__file__).parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"

PACKAGES = ["data", "stats", "model", "trust", "inference", "deploy", "training", "dicom", "serving"]

LAYERS: list[tuple[str, ...]] = [
    ("errors", "constants", "allocator", "provenance", "console"),
    ("data.decode", "stats.metrics", "storage", "stats.logit_transform", "data.hamming", "data.vocabulary"),
    ("data.public",),
    ("data.sources", "data.dicomcheck", "stats.conformal"),
    ("data.cache",),
    ("data.splits", "data.audit"),
    ("data.dataset",),
    ("model.models",),
    ("model.runners", "model.cam"),
    ("stats.ood", "inference.report", "model.modelcard"),
    ("trust.referral",),
    ("trust.calibration", "trust.label_free"),
    ("model.bundle", "training.config", "trust.drift"),
    ("launch", "trust.lineage"),
    ("inference.predict", "dicom.dicomresult"),
    ("inference.evaluation", "deploy.export", "dicom.inferencelog", "dicom.dicomweb"),
    ("training.train", "deploy.quantize"),
    ("training.cv", "training.sweep", "training.adapt", "training.look"),
    ("training.adapt_backbone",),
    ("serving.serve", "dicom.listen", "dicom.worklist", "training.adapt_unlabeled"),
    ("cli",),
]
RANK = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``.../chestxray/data/decode.py`` -> ``data.decode``; a subpackage's ``__init__`` -> ``data``."""
    parts = list(path.relative_to(package).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, package: Path = PACKAGE) -> bool:
    return (package / (name.replace(".", "/") + ".py")).is_file()


def is_package(name: str, package: Path = PACKAGE) -> bool:
    return name == "" or (package / name.replace(".", "/") / "__init__.py").is_file()


def package_imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """The chestxray modules that ``path`` imports (relative or absolute, dotted below the package).

    A name that is neither a module nor a subpackage's attribute reached through the package root
    comes back as ``?name`` (e.g. an old flat path such as ``chestxray.predict``, which only the
    alias finder resolves, or a subpackage's re-export): the package imports its modules by their own
    paths.
    """
    own = module_name(path, package).split(".") if path.name != "__init__.py" else module_name(path, package).split(".") + [""]
    found: set[str] = set()

    def add(base: list[str], names: list[str]) -> None:
        dotted = ".".join(part for part in base if part)
        if is_module(dotted, package):
            found.add(dotted)
        elif is_package(dotted, package):
            for name in names:
                child = f"{dotted}.{name}" if dotted else name
                if is_module(child, package):
                    found.add(child)
                elif dotted or not name.startswith("_"):  # ``from chestxray import __version__`` is no module
                    found.add(f"?{child}")
        else:
            found.add(f"?{dotted}")

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:
                base = own[:len(own) - node.level] + (node.module.split(".") if node.module else [])
                add(base, names)
            elif node.module == "chestxray" or (node.module or "").startswith("chestxray."):
                add(node.module.split(".")[1:], names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("chestxray."):
                    add(alias.name.split(".")[1:], [])
    return found


def modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py")


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): package_imports(path) for path in modules()}


def test_every_module_has_a_place_in_the_flow() -> None:
    found = set(import_graph())
    assert found - set(RANK) == set(), "place the new module(s) in LAYERS (and in docs/ARCHITECTURE.md)"
    assert set(RANK) - found == set(), "LAYERS names module(s) that no longer exist"


def test_the_package_imports_modules_by_their_own_paths() -> None:
    """Never an old flat name (``chestxray.predict``) nor a subpackage's re-export inside the package."""
    paths = list(modules()) + sorted(PACKAGE.rglob("__init__.py"))
    indirect = {module_name(path) or "__init__": sorted(name for name in package_imports(path) if name.startswith("?"))
                for path in paths}
    assert {module: names for module, names in indirect.items() if names} == {}


def test_imports_point_upstream_only() -> None:
    backward = [f"{module} imports {imported} ({'same layer' if RANK[imported] == RANK[module] else 'downstream'})"
                for module, imports in import_graph().items() for imported in sorted(imports)
                if imported in RANK and RANK[imported] >= RANK[module]]
    assert backward == []


def test_subpackages_import_earlier_subpackages_only() -> None:
    order = {name: rank for rank, name in enumerate(PACKAGES)}
    assert set(order) == {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    backward = [f"{module} imports {imported}" for module, imports in import_graph().items() if "." in module
                for imported in sorted(imports) if "." in imported
                and order[imported.split(".")[0]] > order[module.split(".")[0]]]
    assert backward == []


def test_there_is_no_import_cycle() -> None:
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path + [module, imported]
            if imported in graph and imported not in state and (cycle := visit(imported, path + [module])):
                return cycle
        state[module] = "done"
        return None

    cycles = [cycle for module in graph if module not in state and (cycle := visit(module, []))]
    assert cycles == []


def documented_modules(text: str) -> set[str]:
    """Every module the document names as ``data/decode.py`` or ``cli.py`` (in backticks)."""
    return {name.replace("/", ".") for name in re.findall(r"`([a-z_]+(?:/[a-z_]+)?)\.py`", text) if not name.startswith("tests/")}


def test_the_document_names_every_module_and_its_layer() -> None:
    text = DOC.read_text()
    named = documented_modules(text)
    assert set(RANK) - named == set(), "name the module(s) in docs/ARCHITECTURE.md"
    assert named - set(RANK) - {"__init__"} == set(), "docs/ARCHITECTURE.md names module(s) that no longer exist"
    drawn = re.search(r"```\n(.*?)```", text, re.S).group(1)
    rows = [line.split("  ")[0].split() for line in drawn.splitlines()]
    drawn_layers = [set(row) for row in rows if row]
    assert drawn_layers == [set(layer) for layer in LAYERS], "the drawn import map differs from LAYERS"


def test_the_document_check_fails_on_a_missing_module() -> None:
    assert documented_modules("`data/decode.py` and `cli.py`, not data/cache.py") == {"data.decode", "cli"}


def test_the_walker_sees_relative_absolute_and_lazy_imports(tmp_path: Path) -> None:
    package = tmp_path / "chestxray"
    for name in ["errors", "cli", "data/decode", "data/cache", "stats/metrics", "inference/predict", "model/models"]:
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / f"{name}.py").write_text("")
    for sub in ["data", "stats", "inference", "model"]:
        (package / sub / "__init__.py").write_text("")
    source = package / "data" / "x.py"
    source.write_text("from ..errors import InputError\nfrom chestxray.model.models import create_model\n"
                      "import chestxray.data.decode\nfrom ..stats import metrics\nfrom chestxray import __version__\n"
                      "from .cache import build_cache\nfrom chestxray.predict import Predictor\n"
                      "def f():\n    from ..inference.predict import load_model\n")
    assert package_imports(source, package) == {"errors", "model.models", "data.decode", "stats.metrics",
                                                "data.cache", "inference.predict", "?predict"}


def test_reading_the_launch_layout_loads_no_torch() -> None:
    code = "import sys, chestxray.launch as l; l.world_size(); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
