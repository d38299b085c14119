"""The package face: the flat module paths of before import as the very same module objects."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import chestxray
from chestxray import _MOVED


@pytest.mark.slow  # imports every module, Lightning and torch included
@pytest.mark.parametrize("old", sorted(_MOVED))
def test_an_old_module_path_is_the_same_module_object(old: str) -> None:
    new = importlib.import_module(f"chestxray.{_MOVED[old]}")
    assert importlib.import_module(f"chestxray.{old}") is new
    assert sys.modules[f"chestxray.{old}"] is new
    assert new.__name__ == new.__spec__.name == f"chestxray.{_MOVED[old]}"  # the alias leaves the module its own name


@pytest.mark.slow  # fresh interpreters
def test_old_paths_work_in_a_fresh_interpreter_in_every_form() -> None:
    """``import x.y``, ``from x.y import name`` and a monkeypatch through the old path reach one module."""
    code = ("import chestxray.predict, chestxray.inference.predict as new\n"
            "from chestxray.predict import Predictor\n"
            "from chestxray.train import fit\n"
            "import chestxray.training.train as train\n"
            "assert chestxray.predict is new and Predictor is new.Predictor and fit is train.fit\n"
            "import chestxray.predict as old; old.MARK = 1; assert new.MARK == 1\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_monkeypatch_through_the_old_path_patches_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import chestxray.training.train as train
    monkeypatch.setattr("chestxray.train.MONITOR", "patched")
    assert train.MONITOR == "patched"


def test_an_unknown_name_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        chestxray.no_such_thing  # noqa: B018
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("chestxray.no_such_module")


SUBPACKAGES = ["data", "stats", "model", "trust", "inference", "deploy", "training", "dicom", "serving"]


def test_every_module_declares_its_public_names() -> None:
    package = Path(chestxray.__file__).parent
    def assigned(node: ast.stmt) -> set[str]:
        targets = node.targets if isinstance(node, ast.Assign) else []
        return {getattr(name, "id", None) for target in targets for name in getattr(target, "elts", [target])}

    missing = [str(path.relative_to(package)) for path in sorted(package.rglob("*.py"))
               if not any("__all__" in assigned(node) for node in ast.parse(path.read_text()).body)]
    assert missing == []


@pytest.mark.parametrize("sub", SUBPACKAGES)
def test_a_subpackage_re_exports_its_modules_public_names(sub: str) -> None:
    """Every name in a submodule's ``__all__`` is the subpackage's attribute, the same object, except
    names equal to a submodule's (the submodule wins) or defined by two submodules."""
    package = importlib.import_module(f"chestxray.{sub}")
    submodules = {path.stem for path in Path(package.__file__).parent.glob("*.py")} - {"__init__"}
    owners: dict[str, list[str]] = {}
    for name in sorted(submodules):
        for public in importlib.import_module(f"chestxray.{sub}.{name}").__all__:
            owners.setdefault(public, []).append(name)
    expected = {name for name, where in owners.items() if len(where) == 1 and name not in submodules}
    assert set(package.__all__) == expected
    for name in expected:
        assert getattr(package, name) is getattr(importlib.import_module(f"chestxray.{sub}.{owners[name][0]}"), name)


@pytest.mark.slow  # imports the heavy modules
def test_the_package_face_gives_functions_and_classes_even_after_the_old_module_paths_are_imported() -> None:
    code = ("import sys, types\n"
            "import chestxray.audit, chestxray.sweep, chestxray.adapt, chestxray.adapt_unlabeled\n"
            "from chestxray.audit import source_confound\n"
            "import chestxray\n"
            "from chestxray import (audit, sweep, adapt, adapt_unlabeled, evaluate, fit, Predictor, ChestXrayError,\n"
            "                       InputError, export_onnx, quantize_bundle, load_model)\n"
            "for f in (audit, sweep, adapt, adapt_unlabeled, evaluate, fit, export_onnx, quantize_bundle, load_model):\n"
            "    assert isinstance(f, types.FunctionType), f\n"
            "assert isinstance(Predictor, type) and issubclass(InputError, ChestXrayError)\n"
            "assert chestxray.audit is audit and chestxray.sweep is sweep and chestxray.adapt is adapt\n"
            "assert sys.modules['chestxray.audit'] is sys.modules['chestxray.data.audit']\n"
            "assert audit is sys.modules['chestxray.data.audit'].audit\n"
            "assert isinstance(sys.modules['chestxray.sweep'], types.ModuleType)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_every_face_name_is_in_all_and_resolves() -> None:
    assert set(chestxray.__all__) == {"__version__", *chestxray._LAZY}
    for name in chestxray._LAZY:
        assert getattr(chestxray, name) is getattr(importlib.import_module(f"chestxray.{chestxray._LAZY[name]}"), name)
