"""The command line under faults (issue 17): an --out that needs a folder, an --out that cannot be
written (refused before any work), and unreadable files in an evaluation (named, exit 1)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from chestxray.cli import main
from conftest import xray_array
from factories import BINARY_CLASSES, make_bundle


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    monkeypatch.setattr("sys.argv", ["chestxray", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0, capsys.readouterr().err


def _image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(xray_array(seed=seed)).save(path)
    return path


def test_predict_out_into_a_missing_folder_makes_it(tmp_path, monkeypatch, capsys):
    """Before: a traceback after predicting, and the results lost."""
    bundle = make_bundle(tmp_path / "bundle")
    out = tmp_path / "new" / "deeper" / "predictions.csv"
    code, err = run_main(monkeypatch, capsys, "predict", str(bundle), str(_image(tmp_path / "x.png")),
                         "--format", "csv", "--out", str(out))
    assert code == 0, err
    assert len(pd.read_csv(out)) == 1
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temporary file left


def test_an_out_that_cannot_be_written_is_refused_before_predicting(tmp_path, monkeypatch, capsys):
    import chestxray.inference.predict as predict_module

    bundle = make_bundle(tmp_path / "bundle")
    blocker = tmp_path / "a_file"
    blocker.write_text("")

    def never(*args, **kwargs):
        raise AssertionError("predicted before checking --out")

    monkeypatch.setattr(predict_module, "predict_paths", never)
    for out in (blocker / "predictions.csv", tmp_path):
        code, err = run_main(monkeypatch, capsys, "predict", str(bundle), str(tmp_path / "x.png"), "--out", str(out))
        assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err


def test_evaluate_names_the_unreadable_files_and_exits_1(tmp_path, monkeypatch, capsys):
    """Before: exit 0 and only a count; the names were only in metrics.json."""
    bundle = make_bundle(tmp_path / "bundle")
    data = tmp_path / "data"
    for i, name in enumerate(BINARY_CLASSES * 3):
        _image(data / name / f"{name}_{i}.png", seed=i)
    bad = data / "normal" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    code, err = run_main(monkeypatch, capsys, "evaluate", str(bundle), str(data), "--out", str(tmp_path / "ev"),
                         "--n-boot", "20", "--cam-gallery", "0")
    assert code == 1
    assert f"unreadable: {bad}: " in err and "1 unreadable file(s) left out of the metrics" in err
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "report.html").is_file()
