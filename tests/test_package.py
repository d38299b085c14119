"""The package face: the flat module paths of before import as the very same module objects."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import chestxray
from chestxray import _MOVED


@pytest.mark.parametrize("old", sorted(_MOVED))
def test_an_old_module_path_is_the_same_module_object(old: str) -> None:
    new = importlib.import_module(f"chestxray.{_MOVED[old]}")
    assert importlib.import_module(f"chestxray.{old}") is new
    assert sys.modules[f"chestxray.{old}"] is new
    assert new.__name__ == new.__spec__.name == f"chestxray.{_MOVED[old]}"  # the alias leaves the module its own name


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
