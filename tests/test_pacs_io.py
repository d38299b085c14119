"""DICOMweb in and out against a real Orthanc, worklist scoring that resumes, and the audit trail of
predict and serve."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from factories import png_bytes
from fastapi.testclient import TestClient
from dicomnet import CLASSES, CT_STORAGE, bundle, predictor, srs_in, xray_dataset  # noqa: F401 (fixtures)
from orthanc import Orthanc, available
from typer.testing import CliRunner

from chestxray.dicom.inferencelog import AuditTrail
from chestxray.cli import app
from chestxray.serving.serve import create_app
from chestxray.dicom.worklist import score_worklist

class Crash(Exception):
    """Stands for a run killed half-way."""


needs_orthanc = pytest.mark.skipif(available() is not None, reason=available() or "")


def part10(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@needs_orthanc
def test_predict_dicomweb_stow_puts_a_report_per_image_into_the_study(bundle, predictor, tmp_path, dicom_samples,
                                                                     audit_log):
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        sample = pydicom.dcmread(next(iter(sorted(dicom_samples.glob("*.dcm")))))
        same_study = {"StudyInstanceUID": sample.StudyInstanceUID, "PatientID": sample.PatientID,
                      "PatientName": sample.PatientName}
        xray = xray_dataset(seed=4, **same_study)
        ct = xray_dataset(CT_STORAGE, "CT", **same_study)
        for ds in (sample, xray, ct):
            pacs.upload(part10(ds))
        out = tmp_path / "study.json"
        result = CliRunner().invoke(app, ["predict", str(bundle), "--dicomweb", pacs.dicomweb_url, "--study",
                                          sample.StudyInstanceUID, "--stow", "--format", "json", "--out", str(out)])
        assert result.exit_code == 0, result.output
        rows = {row["sop_instance_uid"]: row for row in json.loads(out.read_text())}
        assert set(rows) == {sample.SOPInstanceUID, xray.SOPInstanceUID}  # the CT is skipped, not classified
        assert "skipped" in result.output and ct.SOPInstanceUID in result.output
        expected = predictor.predict([part10(sample), part10(xray)])
        reports = srs_in(pacs)
        for ds, prediction in zip((sample, xray), expected):
            report = reports[ds.SOPInstanceUID]
            assert report["finding"] == [prediction.label] == [rows[ds.SOPInstanceUID]["label"]]
            assert all(abs(report["probabilities"][c] - prediction.probabilities[c]) < 1e-4 for c in CLASSES)
            assert report["model_id"] == predictor.meta.model_id
        lines = audit_lines(audit_log)
        assert {line["sop_instance_uid"] for line in lines} == set(rows) and all(
            line["source"] == "predict" for line in lines)

        worklist = tmp_path / "worklist.csv"  # the same study as a worklist entry, beside a PNG
        (tmp_path / "a.png").write_bytes(png_bytes(seed=1))
        worklist.write_text(f"StudyInstanceUID,path\n{sample.StudyInstanceUID},\n,a.png\n")
        scored = score_worklist(predictor, worklist, tmp_path / "out.csv", dicomweb=pacs.dicomweb_url)
        table = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
        assert scored.scored == 2 and len(table) == 3
        assert set(table["sop_instance_uid"]) == {sample.SOPInstanceUID, xray.SOPInstanceUID, ""}
        assert (table["model_id"] == predictor.meta.model_id).all() and (table["timestamp"] != "").all()
    finally:
        pacs.stop()


def test_dicomweb_that_cannot_be_reached_is_one_line(bundle, capsys, monkeypatch):
    from test_cli import run_main

    code, err = run_main(monkeypatch, capsys, "predict", str(bundle), "--dicomweb", "http://127.0.0.1:9/dicom-web",
                         "--study", "1.2.3")
    assert code == 2 and err.count("\n") == 1 and "cannot reach" in err


def test_worklist_resumes_where_an_interrupted_run_stopped(predictor, tmp_path, make_dicom, monkeypatch):
    files = []
    for i in range(5):
        (tmp_path / f"x{i}.png").write_bytes(png_bytes(seed=i))
        files.append(f"x{i}.png")
    dicom = make_dicom("d.dcm", xray_dataset().pixel_array, Modality="DX", AccessionNumber="A42",
                       StudyInstanceUID="1.2.826.0.1.3680043.1", SOPInstanceUID="1.2.826.0.1.3680043.2")
    worklist = tmp_path / "list.csv"
    worklist.write_text("path\n" + "\n".join([*files, str(dicom), "missing.png"]) + "\n")
    out = tmp_path / "results.csv"
    real_predict, calls = predictor.predict, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Crash  # the machine went down mid-run
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(predictor, "predict", dies_on_second_batch)
    with pytest.raises(Crash):
        score_worklist(predictor, worklist, out, batch_size=3)
    assert len(pd.read_csv(out)) == 3
    monkeypatch.setattr(predictor, "predict", real_predict)
    result = score_worklist(predictor, worklist, out, batch_size=3)
    assert (result.entries, result.skipped, result.scored, result.failed) == (7, 3, 4, 1)
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert table["worklist_key"].is_unique and len(table) == 7
    row = table[table["path"] == str(dicom)].iloc[0]
    assert (row["study_instance_uid"], row["sop_instance_uid"], row["accession_number"]) == (
        "1.2.826.0.1.3680043.1", "1.2.826.0.1.3680043.2", "A42")
    assert "no such file" in table[table["path"].str.endswith("missing.png")].iloc[0]["error"] or \
        "cannot read" in table[table["path"].str.endswith("missing.png")].iloc[0]["error"]
    assert score_worklist(predictor, worklist, out).scored == 0  # all done: nothing again


@pytest.mark.parametrize("text, reason", [("name,label\na.png,x\n", "needs a 'path'"), ("", "not a readable CSV")])
def test_a_malformed_worklist_is_one_line(bundle, tmp_path, capsys, monkeypatch, text, reason):
    from test_cli import run_main

    (tmp_path / "w.csv").write_text(text)
    code, err = run_main(monkeypatch, capsys, "predict", str(bundle), "--worklist", str(tmp_path / "w.csv"))
    assert code == 2 and reason in err and "w.csv" in err


def test_predict_and_serve_write_one_audit_line_per_inference_without_pixels(bundle, predictor, tmp_path,
                                                                            make_dicom, audit_log):
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(seed=2))
    dicom = make_dicom("p.dcm", xray_dataset().pixel_array, PatientID="SECRET-ID", PatientName="Doe^Jane",
                       SOPInstanceUID="1.2.826.0.1.3680043.9")
    result = CliRunner().invoke(app, ["predict", str(bundle), str(image), str(dicom), "--format", "csv"])
    assert result.exit_code == 0, result.output
    lines = audit_lines(audit_log)
    assert [line["source"] for line in lines] == ["predict", "predict"]
    assert lines[1]["sop_instance_uid"] == "1.2.826.0.1.3680043.9" and lines[0]["sop_instance_uid"] is None
    assert all(line["model_id"] == predictor.meta.model_id and len(line["input_sha256"]) == 64 for line in lines)
    assert "SECRET-ID" not in audit_log.read_text() and "Doe" not in audit_log.read_text()

    served = tmp_path / "served.jsonl"
    with TestClient(create_app(predictor, audit=AuditTrail(served, patient_fields=True))) as client:
        answer = client.post("/v1/predict", files={"file": ("p.dcm", dicom.read_bytes(), "application/dicom")})
        assert answer.status_code == 200
        assert client.post("/v1/predict", files={"file": ("x.png", b"broken", "image/png")}).status_code in (415, 422)
    lines = audit_lines(served)
    assert lines[0]["source"] == "serve" and lines[0]["caller"].startswith("api:")
    assert lines[0]["patient"]["PatientID"] == "SECRET-ID"  # configured to keep them
    assert lines[0]["result"]["label"] == answer.json()["label"] and lines[0]["latency_ms"] > 0
    assert "PixelData" not in served.read_text() and len(served.read_text()) < 4000
    assert AuditTrail(tmp_path / "no.jsonl").patient_fields is False


def _reads_until_memory_runs_out(monkeypatch):
    """``Path.read_bytes`` of a device or of a file over the size limit stands for what it would do
    on a real run (read until memory runs out): it raises ``MemoryError`` instead of reading."""
    from chestxray.data.decode import MAX_FILE_BYTES

    real = Path.read_bytes

    def read_bytes(self):
        if not self.is_file() or self.stat().st_size > MAX_FILE_BYTES:
            raise MemoryError(f"read {self} whole")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def test_worklist_refuses_devices_fifos_and_oversize_files_before_reading(predictor, tmp_path, monkeypatch):
    import os
    import threading
    import time

    _reads_until_memory_runs_out(monkeypatch)
    (tmp_path / "ok.png").write_bytes(png_bytes(seed=1))
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as handle:
        handle.truncate(3 * 2**30)  # 3 GB on paper, no disk used
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)

    def unblock_a_reader():  # before the fix the run hangs opening the FIFO: a late writer releases it
        time.sleep(5)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # nobody opened it: as it should be

    threading.Thread(target=unblock_a_reader, daemon=True).start()
    worklist = tmp_path / "list.csv"
    worklist.write_text("path\n/dev/zero\nhuge.png\npipe.png\nok.png\n")
    start = time.perf_counter()
    result = score_worklist(predictor, worklist, tmp_path / "out.csv")
    assert time.perf_counter() - start < 5
    assert (result.entries, result.scored, result.failed) == (4, 4, 3)
    errors = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False).set_index("path")["error"]
    assert errors["/dev/zero"] == "not a file" and errors[str(fifo)] == "not a file"
    assert "exceeds the limit" in errors[str(sparse)] and errors[str(tmp_path / "ok.png")] == ""


def test_a_repeated_worklist_row_is_scored_once_and_said_so(bundle, tmp_path, capsys, monkeypatch):
    from test_cli import run_main

    for i in range(2):
        (tmp_path / f"x{i}.png").write_bytes(png_bytes(seed=i))
    worklist = tmp_path / "list.csv"
    worklist.write_text("path\nx0.png\nx1.png\nx0.png\n./x0.png\n" + f"{tmp_path / 'x1.png'}\n")
    out = tmp_path / "out.csv"
    code, err = run_main(monkeypatch, capsys, "predict", str(bundle), "--worklist", str(worklist), "--out", str(out),
                         "--no-audit")
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert code == 0, err
    assert sorted(table["path"]) == [str(tmp_path / "x0.png"), str(tmp_path / "x1.png")]
    assert "5 worklist entries" in err and "2 scored now" in err and "3 repeated row(s) scored once" in err
