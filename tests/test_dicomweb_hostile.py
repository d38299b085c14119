"""DICOMweb against hostile or broken servers (issue 28), each a tiny HTTP server on a loopback thread:
an answer that streams forever is cut at the size limit, a server that never answers or drips its
answer is cut at the total deadline, and junk, HTML, non-DICOM and truncated parts are failures of
that study or instance, reported in one line, while a worklist goes on and writes its results."""

from __future__ import annotations

import socket

import pandas as pd
import pytest
from dicomnet import bundle, predictor, xray_dataset  # noqa: F401 (fixtures)
from factories import png_bytes
from hostile import answers, drips, multipart, part10, silent, streams_forever
from hostile import http_server as server

import chestxray.dicomweb as dicomweb
from chestxray.errors import ChestXrayError
from chestxray.worklist import score_worklist


def test_an_answer_that_streams_forever_is_cut_at_the_size_limit():
    """Before: the whole answer was read into memory (4.2 GB, then a MemoryError traceback)."""
    sent: list[int] = []
    with server(streams_forever(sent)) as url:
        with pytest.raises(ChestXrayError, match="exceeds the limit of 1,048,576 bytes"):
            dicomweb.retrieve_study(url, "1.2.3", limit=1 << 20, timeout=60)
    # the reader stopped at the limit: the server could send only what the socket buffers held beyond it
    assert sum(sent) < 64 << 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", ["silent", "drip-head", "drip-body"])
def test_a_server_that_never_answers_or_drips_is_cut_at_the_total_deadline(behaviour, monkeypatch):
    """Before: the timeout was per read, so a drip feed never timed out (and silence cost 332 s)."""
    answer = silent() if behaviour == "silent" else drips(body_too=behaviour == "drip-body")
    monkeypatch.setattr(dicomweb, "TIMEOUT_S", 0.5)
    with server(answer) as url:
        with pytest.raises(ChestXrayError, match=r"no complete answer .*within 0.5 s"):
            dicomweb.retrieve_study(dicomweb.client(url, timeout=0.5), "1.2.3")


def test_junk_html_non_dicom_and_truncated_parts_fail_their_study_and_the_worklist_goes_on(predictor, tmp_path):
    """Before: junk multipart or HTML aborted the whole worklist run with a traceback and no results file;
    a truncated instance was 'skipped: ?: not an X-ray image'."""
    good = xray_dataset()
    truncated = part10(xray_dataset(seed=1))[:-1500]
    bodies = {
        "1.1": answers(b"<html><body>Login</body></html>", "text/html"),
        "1.2": answers(b"garbage without any boundary"),
        "1.3": answers(multipart(("application/json", b'{"a": 1}'), ("application/dicom", part10(good)))),
        "1.4": answers(multipart(("application/dicom", truncated))),
        "1.5": answers(multipart(("application/dicom", b"\x00" * 300))),
    }
    served: list[str] = []

    def route(conn: socket.socket) -> None:
        study = served.pop(0)
        bodies[study](conn)

    (tmp_path / "ok.png").write_bytes(png_bytes())
    worklist = tmp_path / "list.csv"
    worklist.write_text("study_instance_uid,path\n" + "".join(f"{uid},\n" for uid in bodies) + ",ok.png\n")
    served.extend(bodies)
    with server(route) as url:
        result = score_worklist(predictor, worklist, tmp_path / "out.csv", dicomweb=url)
    table = pd.read_csv(tmp_path / "out.csv", dtype=str, keep_default_na=False)
    errors = dict(zip(table["worklist_key"], table["error"]))
    assert "text/html, not multipart/related" in errors["study:1.1"]
    assert "multipart" in errors["study:1.2"]
    assert "a application/json part, not a DICOM instance" in errors["study:1.3"]
    assert (table[table["worklist_key"] == "study:1.3"]["sop_instance_uid"] == str(good.SOPInstanceUID)).any()
    assert "truncated" in errors["study:1.4"]
    assert "not a readable DICOM" in errors["study:1.5"]
    assert errors["path:" + str(tmp_path / "ok.png")] == ""  # the run went on
    assert result.entries == 6 and result.failed == 5


def test_predict_reports_a_truncated_instance_from_dicomweb_and_exits_nonzero(bundle, monkeypatch, capsys):
    from test_cli import run_main

    good, cut = xray_dataset(), part10(xray_dataset(seed=1))[:-1500]
    with server(answers(multipart(("application/dicom", part10(good)), ("application/dicom", cut)))) as url:
        code, err = run_main(monkeypatch, capsys, "predict", str(bundle), "--dicomweb", url, "--study", "1.2.3",
                             "--format", "csv")
    assert code == 1, err
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "truncated" in failed[0] and "Traceback" not in err
