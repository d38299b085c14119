"""DICOMweb against hostile or broken servers (issue 28), each a tiny HTTP server on a loopback thread:
an answer that streams forever is cut at the size limit, a server that never answers or drips its
answer is cut at the total deadline, and junk, HTML, non-DICOM and truncated parts are failures of
that study or instance, reported in one line, while a worklist goes on and writes its results."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pandas as pd
import pytest
from dicomnet import bundle, predictor, xray_dataset  # noqa: F401 (fixtures)
from factories import png_bytes

import chestxray.dicomweb as dicomweb
from chestxray.errors import ChestXrayError
from chestxray.worklist import score_worklist

BOUNDARY = "b0undary"


@contextmanager
def server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback HTTP server that reads one request head per connection and lets ``answer`` write
    to the socket; yields its URL. ``answer`` may loop: it ends when the client goes away."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            head = b""
            conn.settimeout(10)
            try:
                while b"\r\n\r\n" not in head and (chunk := conn.recv(4096)):
                    head += chunk
                answer(conn)
            except OSError:  # the client hung up: what a hostile server sees when it is cut
                pass

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def multipart(*parts: tuple[str, bytes]) -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n" for kind, data in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


def answers(body: bytes, content_type: str = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'):
    def answer(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
    return answer


def part10(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_an_answer_that_streams_forever_is_cut_at_the_size_limit():
    """Before: the whole answer was read into memory (4.2 GB, then a MemoryError traceback)."""
    sent = []

    def forever(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: multipart/related; boundary=x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        while True:
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent.append(len(chunk))

    with server(forever) as url:
        with pytest.raises(ChestXrayError, match="exceeds the limit of 1,048,576 bytes"):
            dicomweb.retrieve_study(url, "1.2.3", limit=1 << 20, timeout=60)
    # the reader stopped at the limit: the server could send only what the socket buffers held beyond it
    assert sum(sent) < 64 << 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("behaviour", ["silent", "drip-head", "drip-body"])
def test_a_server_that_never_answers_or_drips_is_cut_at_the_total_deadline(behaviour, monkeypatch):
    """Before: the timeout was per read, so a drip feed never timed out (and silence cost 332 s)."""
    def answer(conn: socket.socket) -> None:
        if behaviour == "silent":
            time.sleep(120)
            return
        head = b"HTTP/1.1 200 OK\r\nContent-Type: multipart/related; boundary=x\r\nContent-Length: 100000\r\n\r\n"
        if behaviour == "drip-body":
            conn.sendall(head)
            head = b"y" * 100000
        for byte in head:
            conn.sendall(bytes([byte]))
            time.sleep(0.05)

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
