"""One clear line instead of a traceback (issue 28): each case the hostile campaign found, through
the command line a user types (exit code 2, one line on stderr) or the function a server calls."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from factories import build_tiny_bundle, make_bundle, png_bytes

from chestxray.decode import MAX_PIXELS, load_image
from chestxray.errors import ChestXrayError, InputError
from chestxray.predict import load_model


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b")


def one_line(monkeypatch, capsys, *args: str) -> str:
    from test_cli import run_main

    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_a_deeply_nested_model_json_is_one_line(bundle, tmp_path, monkeypatch, capsys):
    """Before: RecursionError traceback, in predict and in serve."""
    nested = Path(shutil.copytree(bundle, tmp_path / "nested"))
    (nested / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "x.png").write_bytes(png_bytes())
    err = one_line(monkeypatch, capsys, "predict", str(nested), str(tmp_path / "x.png"), "--no-audit")
    assert "model.json: not a model.json: nested too deeply" in err
    with pytest.raises(InputError, match="nested too deeply"):  # what serve loads, before uvicorn starts
        load_model(nested)


def test_a_file_with_a_zip_signature_that_is_no_zip_is_one_line(tmp_path, monkeypatch, capsys):
    """Before: zipfile.BadZipFile traceback from audit (and train) of such an .npz."""
    fake = tmp_path / "data.npz"
    fake.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    err = one_line(monkeypatch, capsys, "audit", str(fake), "--out", str(tmp_path / "audit"))
    assert "data.npz: not a readable MedMNIST .npz file" in err


def test_weights_that_are_no_weights_file_are_one_line(tmp_path):
    """Before: '--weights /etc/passwd' said 'list index out of range' (torch.load's IndexError)."""
    from chestxray.models import read_state_file

    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(InputError, match="not a weights file"):
        read_state_file(text)


def test_an_onnx_graph_with_another_number_of_classes_is_named(tmp_path):
    """Before: 'conformal: 4 probabilities for 5 classes' at the first prediction."""
    from chestxray.export import export_onnx

    exported = export_onnx(build_tiny_bundle(tmp_path / "b"), opset=17)
    folder = exported.path.parent
    data = json.loads((folder / "model.json").read_text())
    classes = [*data["classes"], "extra"]
    data["classes"] = classes
    for name in ("operating_points", "conformal", "calibration", "source_confound"):
        data.pop(name, None)
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=f"the graph gives {len(classes) - 1} class scores but model.json declares "
                                         f"{len(classes)} classes"):
        load_model(folder, backend="onnx")


def test_grad_cam_into_a_folder_that_cannot_be_written_is_one_line(bundle, tmp_path, monkeypatch, capsys):
    """Before: a FileNotFoundError / PermissionError traceback from predict --cam."""
    (tmp_path / "x.png").write_bytes(png_bytes())
    err = one_line(monkeypatch, capsys, "predict", str(bundle), str(tmp_path / "x.png"), "--no-audit",
                   "--cam", str(tmp_path / "x.png" / "cams"))  # under a file: what a read-only folder does
    assert "cams: cannot create the Grad-CAM folder" in err


def test_the_bomb_message_quotes_the_documented_limit():
    """Before: an upload over PIL's own limit quoted PIL's 178,956,970 pixels, not the documented 80 million."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")
    with pytest.raises(InputError) as err:
        load_image(png, name="upload.png")
    assert f"exceeds the limit of {MAX_PIXELS:,} pixels" in err.value.reason and "178" not in err.value.reason


def test_serve_refuses_a_port_out_of_range_from_python(bundle):
    from chestxray.serve import serve

    with pytest.raises(ChestXrayError, match="--port 99999: a port is 1 to 65535"):
        serve(bundle, port=99999)


def test_random_bytes_as_a_dicom_part_say_so_without_pydicom_internals() -> None:
    import numpy as np

    from chestxray.dicom.dicomresult import read_dataset
    from chestxray.errors import InputError

    junk = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(InputError) as raised:
        read_dataset(junk, "part 3")
    assert "no SOP Instance UID" in str(raised.value) and "object has no attribute" not in str(raised.value)
