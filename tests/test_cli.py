"""The command line: one-line errors with exit code 2, per-file failures with exit code 1, help."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from factories import TINY, make_bundle, write_xrays
from PIL import Image
from typer.testing import CliRunner

from chestxray.model.bundle import META_FILE
from chestxray.cli import app, main
from chestxray.training.config import RuntimeSettings, TrainConfig, declared_options
from conftest import xray_array

COMMANDS = ["audit", "train", "cv", "sweep", "show-batch", "lr-find", "evaluate", "predict", "export", "serve", "listen"]


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Run the console-script entry point; return its exit code and stderr."""
    monkeypatch.setattr("sys.argv", ["chestxray", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


@pytest.mark.parametrize("command", ["train", "cv", "sweep", "lr-find"])
def test_every_training_option_is_a_typed_option_with_its_declared_help_and_default(command: str) -> None:
    help_text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}, terminal_width=400).output
    output = " ".join(help_text.split())
    for cls in (TrainConfig, RuntimeSettings):
        for name, default, meta in declared_options(cls):
            flag = "--" + name.replace("_", "-")
            shown = str(default).lower() if isinstance(default, bool) else str(default)
            assert f"{flag} " in output and f"{meta['help']} (default: {shown}" in output, name
            if isinstance(default, bool):
                assert f"--no-{flag[2:]}" in output
    assert "(default: a timestamp)" in output  # not eaten as rich markup
    for panel in ("Model options", "Optimisation options", "Hardware options"):
        assert panel in output


def test_training_flags_are_typed_and_reach_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}

    def fake_fit(data, config, runtime, **kwargs):
        seen.update(config=config, runtime=runtime)
        raise SystemExit(0)

    monkeypatch.setattr("chestxray.train.fit", fake_fit)
    (tmp_path / "old.yaml").write_text("epochs: 4\nchannels_last: false\ndevices: 1\n")  # an older config
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--config", str(tmp_path / "old.yaml"), "--hflip",
                                      "--lr", "0.01", "--num-workers", "2"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == TrainConfig(epochs=4, hflip=True, lr=0.01)
    assert seen["runtime"] == RuntimeSettings(channels_last=False, devices="1", num_workers=2)
    assert "devices" not in seen["config"].to_dict()
    for args in (["--hflip", "False"], ["--channels-last=false"], ["--epochs", "many"]):  # refused by the parser
        assert CliRunner().invoke(app, ["train", str(tmp_path), *args]).exit_code == 2, args
    refused = CliRunner().invoke(app, ["train", str(tmp_path), "--optimizer", "lbfgs"])  # by the declaration
    assert "optimizer must be one of adamw, adam, rmsprop, sgd, not 'lbfgs'" in str(refused.exception)


@pytest.mark.parametrize("args, expected", [
    (["audit", "/no/such/folder"], "/no/such/folder: no such file or folder"),
    (["train", "/no/such/folder"], "/no/such/folder: no such file or folder"),
    (["predict", "/no/such/bundle", "x.png"], "/no/such/bundle: bundle folder not found"),
    (["train", ".", "--epochs", "0"], "epochs must be at least 1, not 0"),
])
def test_bad_input_is_one_line_and_exit_code_2(monkeypatch, capsys, args: list[str], expected: str) -> None:
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 2
    assert expected in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


@pytest.mark.parametrize("args, code, stream, expected", [
    (["--version"], 0, "stdout", "chestxray"),
    (["audit", "/no/such/folder"], 2, "stderr", "/no/such/folder: no such file or folder"),
])
def test_the_console_script_exits_at_once_with_the_commands_status_and_all_its_output(
        args: list[str], code: int, stream: str, expected: str) -> None:
    """``run`` skips the interpreter's teardown: piped (block-buffered) output must still arrive whole."""
    script = "import sys; from chestxray.cli import run; sys.argv = ['chestxray', *sys.argv[1:]]; run()"
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CHESTXRAY_ALLOCATOR": "system"})
    assert done.returncode == code, done.stderr
    assert expected in getattr(done, stream) and "Traceback" not in done.stderr


def test_predict_keeps_going_past_a_bad_file_and_exits_1(tmp_path: Path, monkeypatch, capsys) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    good = tmp_path / "good.png"
    Image.fromarray(xray_array()).save(good)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    out = tmp_path / "predictions.csv"
    code, err = run_main(monkeypatch, capsys, "predict", str(bundle), str(good), str(bad), "--format", "csv",
                         "--out", str(out))
    assert code == 1
    assert f"error: {bad}: not a readable image" in err
    table = pd.read_csv(out)
    assert list(table["file"]) == [str(good), str(bad)]
    assert table["label"].iloc[0] in ("normal", "pneumonia") and pd.isna(table["label"].iloc[1])
    assert abs(table[["normal", "pneumonia"]].iloc[0].sum() - 1) < 1e-6


def test_predict_json_to_stdout(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    image = tmp_path / "x.png"
    Image.fromarray(xray_array()).save(image)
    result = CliRunner().invoke(app, ["predict", str(bundle), str(image), "--format", "json"])
    assert result.exit_code == 0
    records = pd.read_json(io.StringIO(result.stdout))
    assert records["file"].tolist() == [str(image)] and {"ood", "ood_score"} <= set(records.columns)


def test_predict_calls_classes_at_an_operating_point(tmp_path: Path, monkeypatch, capsys) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    meta = json.loads((bundle / META_FILE).read_text())
    meta["operating_points"] = {"pneumonia": {"sensitivity_95": 0.0, "youden": 1.1}, "normal": {"youden": 0.5}}
    (bundle / META_FILE).write_text(json.dumps(meta))
    image, out = tmp_path / "x.png", tmp_path / "p.csv"
    Image.fromarray(xray_array()).save(image)
    assert run_main(monkeypatch, capsys, "predict", str(bundle), str(image), "--format", "csv", "--out", str(out),
                    "--operating-point", "sensitivity_95")[0] == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns[:3]) == ["file", "label", "called"] and table["called"].tolist() == ["pneumonia"]
    run_main(monkeypatch, capsys, "predict", str(bundle), str(image), "--format", "csv", "--out", str(out),
             "--operating-point", "youden")
    expected = "normal" if pd.read_csv(out)["normal"].iloc[0] >= 0.5 else ""
    assert pd.read_csv(out, keep_default_na=False)["called"].tolist() == [expected]  # 1.1: never pneumonia
    shown = CliRunner().invoke(app, ["predict", str(bundle), str(image), "--operating-point", "sensitivity_95"])
    assert shown.exit_code == 0 and "called" in shown.stdout and "pneumonia" in shown.stdout
    code, err = run_main(monkeypatch, capsys, "predict", str(bundle), str(image), "--operating-point", "f1")
    assert code == 2 and "operating point 'f1' is not in this bundle (it has: sensitivity_95, youden)" in err


def test_the_python_api_is_one_import_away() -> None:
    import chestxray
    from chestxray import TrainConfig, cross_validate, evaluate, fit, load_model, load_samples
    from chestxray.training.config import TrainConfig as config_class
    from chestxray.inference.predict import load_model as loader

    assert TrainConfig is config_class and load_model is loader
    import chestxray.inference.evaluation  # noqa: F401 - importing the module must not shadow the function

    assert all(callable(f) for f in (cross_validate, chestxray.evaluate, evaluate, fit, load_samples))
    assert set(chestxray.__all__) >= {"fit", "load_model", "TrainConfig"}
    with pytest.raises(AttributeError, match="no attribute"):
        chestxray.not_a_thing  # noqa: B018


@pytest.mark.slow
@pytest.mark.parametrize("onnx", [True, False])
def test_train_exports_onnx_unless_told_not_to(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                               tmp_path: Path, onnx: bool) -> None:
    data = write_xrays(tmp_path / "data")
    code, err = run_main(monkeypatch, capsys, "train", str(data), "--out", str(tmp_path / "runs"), "--name", "r",
                         "--arch", "tf_efficientnet_lite0", "--weights", "none", "--image-size", "32",
                         "--epochs", "1", "--batch-size", "8", "--freeze-epochs", "0",
                         *([] if onnx else ["--no-onnx"]))
    bundle = tmp_path / "runs" / "r" / "bundle"
    assert code == 0, err
    assert (bundle / "model.onnx").is_file() == onnx
    if onnx:
        from chestxray.inference.predict import load_model

        assert load_model(bundle, backend="auto").backend == "onnx"  # its weights digest matches


@pytest.mark.slow
def test_fit_writes_the_bundle_chestxray_train_writes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                      tmp_path: Path) -> None:
    """The ONNX export after training is part of the API: ``fit()`` and ``chestxray train`` write the same
    files, the same weights and the same graph."""
    from chestxray.provenance import file_sha256
    from chestxray.training.config import TrainConfig
    from chestxray.training.train import fit

    data = write_xrays(tmp_path / "data")
    code, err = run_main(monkeypatch, capsys, "train", str(data), "--out", str(tmp_path / "cli"), "--name", "r",
                         "--arch", "tf_efficientnet_lite0", "--weights", "none", "--image-size", "32",
                         "--epochs", "1", "--batch-size", "8", "--freeze-epochs", "0")
    assert code == 0, err
    run = fit(data, TrainConfig(arch="tf_efficientnet_lite0", weights="none", image_size=32, epochs=1, batch_size=8,
                                freeze_epochs=0), out_dir=tmp_path / "api", name="r", progress=False)
    cli_bundle, api_bundle = tmp_path / "cli" / "r" / "bundle", run.bundle_dir
    assert sorted(p.name for p in api_bundle.iterdir()) == sorted(p.name for p in cli_bundle.iterdir())
    assert "model.onnx" in {p.name for p in api_bundle.iterdir()} and run.onnx is not None
    assert file_sha256(api_bundle / "model.safetensors") == file_sha256(cli_bundle / "model.safetensors")
    assert sorted(p.name for p in run.run_dir.iterdir()) == sorted(p.name for p in (tmp_path / "cli" / "r").iterdir())


@pytest.mark.slow
def test_cv_and_sweep_print_their_results_once(tmp_path: Path) -> None:
    data = write_xrays(tmp_path / "data")
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]
    runs = str(tmp_path / "runs")
    cv = CliRunner().invoke(app, ["cv", str(data), "--folds", "3", "--out", runs, "--name", "c", *flags])
    assert cv.exit_code == 0, cv.output
    assert cv.stdout.count("3-fold cross-validation") == 1 and cv.stdout.count("out-of-fold") == 1
    assert cv.stdout.count("mean ± std") == 1 and cv.stdout.count("results:") == 1
    assert cv.stdout.count("prediction sets at 90% (each fold model's, on its held-out fold): coverage") == 1
    sweep = CliRunner().invoke(app, ["sweep", str(data), "--trials", "1", "--out", runs, "--name", "s", *flags])
    assert sweep.exit_code == 0, sweep.output
    assert sweep.stdout.count("best trial 0") == 1 and sweep.stdout.count("best config:") == 1
    again = CliRunner().invoke(app, ["cv", str(data), "--folds", "3", "--out", runs, "--name", "c", *flags])
    assert again.exit_code != 0 and "already holds a run" in str(again.exception or again.output)


def _four_images(tmp_path: Path) -> list[Path]:
    """Four X-rays with long folder and file names, one of them unreadable."""
    paths = []
    for i, folder in enumerate(["bacterial_pneumonia_site_a", "covid19_site_b", "normal_site_c", "viral_site_d"]):
        path = tmp_path / "a_rather_long_parent_folder_name" / folder / f"person{i}_patient_scan_{i:04d}_frontal_view.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(xray_array(seed=i)).save(path)
        paths.append(path)
    paths[-1].write_bytes(b"not an image")
    return paths


def test_piped_predict_of_four_images_is_a_short_table_that_fits_80_columns(tmp_path: Path) -> None:
    from factories import sets_for

    confound = {"method": "test", "threshold": 0.8, "auc": {"normal": 0.95, "pneumonia": 0.97},
                "flagged": ["normal", "pneumonia"], "note": ""}
    bundle = make_bundle(tmp_path / "bundle", conformal=sets_for(0.6), source_confound=confound)
    images = _four_images(tmp_path)
    result = CliRunner().invoke(app, ["predict", str(bundle), *map(str, images)], env={"COLUMNS": "80"})
    assert result.exit_code == 1  # the unreadable one
    lines = result.stdout.splitlines()
    assert len(lines) <= 12, result.stdout
    table = lines[:2 + len(images)]  # header, rule, one line per image
    assert all(len(line) <= 80 for line in table), "\n".join(table)
    assert table[0].split() == ["file", "label", "p", "set", "ood", "refer"]
    assert [line.split()[1] for line in table[2:]][-1] == "unreadable"
    for path, line in zip(images, table[2:]):
        assert path.name in line or "…" in line  # the file's own name, or a shortened one
    cautions = [line for line in lines if line.startswith("* caution:")]
    assert 1 <= len(cautions) <= 2 and len(set(cautions)) == len(cautions)  # each caution once, not per row
    assert sum("caution" in line for line in lines) == len(cautions)


def test_the_predict_table_shows_the_header_verdict_and_wraps_only_in_a_terminal(tmp_path: Path, make_dicom,
                                                                                 monkeypatch) -> None:
    from rich.console import Console

    import chestxray.cli as cli

    bundle = make_bundle(tmp_path / "bundle", guard=False)  # the header is the one check that runs
    ct, dx = make_dicom("ct.dcm", xray_array(64, 64), Modality="CT"), make_dicom("dx.dcm", xray_array(64, 64))
    piped = CliRunner().invoke(app, ["predict", str(bundle), str(ct), str(dx)], env={"COLUMNS": "60"})
    assert piped.exit_code == 0, piped.output
    rows = {line.split()[0]: line.split() for line in piped.stdout.splitlines()[2:4]}
    assert rows["ct.dcm"][-2:] == ["FAIL", "dicom"] and rows["dx.dcm"][-2:] == ["ok", "no"]  # verdict, refer codes
    screen = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=screen, force_terminal=True, width=60, color_system=None))
    assert CliRunner().invoke(app, ["predict", str(bundle), str(ct), str(dx)]).exit_code == 0
    shown = screen.getvalue().splitlines()
    assert all(len(line) <= 60 for line in shown), screen.getvalue()
    assert len(shown) > 5  # the legend was wrapped to the terminal...
    legend = "dicom: the header check; refer: why a reader should look. All reasons: --format json."
    assert legend in " ".join(line.strip() for line in shown[4:])  # ...between words only


@pytest.mark.parametrize("command", ["train", "predict", "serve"])
def test_help_shows_no_bool_placeholder_nor_an_empty_default(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout and "(default: )" not in result.stdout
    if command == "serve":
        assert "TCP port of the API" in result.stdout
