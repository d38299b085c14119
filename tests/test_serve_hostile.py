"""The server under hostile clients (issue 17), on a real uvicorn server over loopback sockets:
idle and slow-header connections are closed after a deadline and never starve others, one address
may hold a bounded number of connections, and a slow upload is cut off."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from chestxray.inference.predict import load_model
from chestxray.serving.serve import (MAX_CONNECTIONS_PER_CLIENT, _RequestLimit, background_server, create_app,
                             guarded_protocol)
from factories import make_bundle, png_bytes
from hostile import closed_by_server


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory):
    return load_model(make_bundle(tmp_path_factory.mktemp("bundle")))


@pytest.fixture
def app(predictor):
    return create_app(predictor, api_key="")  # an app's executors end with its server: one per test


def _connect(url: str, source: str = "127.0.0.1") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))  # every 127.x.y.z is loopback on Linux: other client addresses
    sock.connect((host, int(port)))
    return sock


def _answers_everyone_else(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        response = client.post("/v1/predict", files={"file": ("x.png", png_bytes(), "image/png")})
        assert response.status_code == 200, response.text
        assert response.json()["probabilities"]


def test_200_idle_and_slow_header_connections_leave_the_server_answering(app):
    """Before: uvicorn's limit_concurrency counted connections that never sent a request, so 64 of
    them made every request 503, /healthz included."""
    with background_server(app, protocol=guarded_protocol(header_timeout=60)) as url:
        hostile = []
        for i in range(200):  # 20 per address, within the per-address cap
            sock = _connect(url, f"127.0.0.{2 + i // 20}")
            if i % 2:  # half of them start a request and never finish its head
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data")
            hostile.append(sock)
        try:
            _answers_everyone_else(url)
            assert not any(closed_by_server(sock, 0.01) for sock in hostile[:10])  # held, not dropped at once
        finally:
            for sock in hostile:
                sock.close()


def test_idle_and_slow_header_connections_are_closed_after_the_deadline(app):
    with background_server(app, protocol=guarded_protocol(header_timeout=0.5)) as url:
        idle, dribbling = _connect(url), _connect(url)
        start = time.monotonic()
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        closed = False
        for byte in request:  # one byte every 50 ms: each resets uvicorn's keep-alive timer, not the deadline
            try:
                dribbling.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.05)
        assert closed or closed_by_server(dribbling, 2)
        assert closed_by_server(idle, 2)
        assert time.monotonic() - start < 6
        # a keep-alive connection that sends its next request head slowly is closed the same way
        keep = _connect(url)
        keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in keep.recv(4096)
        keep.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert closed_by_server(keep, 3)
        _answers_everyone_else(url)


def test_connections_beyond_the_cap_of_one_address_are_refused(app):
    with background_server(app, protocol=guarded_protocol(header_timeout=60, max_per_client=5)) as url:
        held = [_connect(url, "127.0.0.9") for _ in range(5)]
        extra = _connect(url, "127.0.0.9")
        extra.settimeout(5)
        answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"too many open connections from 127.0.0.9" in answer
        assert closed_by_server(extra, 2)
        assert not closed_by_server(held[0], 0.05)
        _answers_everyone_else(url)  # from another address
        for sock in held:
            sock.close()
        time.sleep(0.2)
        again = _connect(url, "127.0.0.9")  # the slots are free again once the connections close
        again.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        again.settimeout(5)
        assert b"200 OK" in again.recv(4096)
        again.close()
    assert MAX_CONNECTIONS_PER_CLIENT >= 8  # a browser opens about 6


def test_an_upload_that_does_not_arrive_in_time_gets_408(app, monkeypatch):
    import chestxray.serving.serve as serve_module

    monkeypatch.setattr(serve_module, "BODY_TIMEOUT_S", 0.5)
    with background_server(app) as url:
        sock = _connect(url)
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 5000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                     b"filename=\"x.png\"\r\n\r\n\x89PNG")
        sock.settimeout(10)
        answer = b""
        while b'"error"' not in answer and (chunk := sock.recv(4096)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"upload not received within 0.5 s" in answer, answer
        sock.close()
        _answers_everyone_else(url)


def test_requests_beyond_the_active_limit_get_503_but_healthz_answers():
    import asyncio

    asyncio.run(_overload())


async def _overload() -> None:
    import asyncio

    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limit = _RequestLimit(slow_app, limit=2)
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": "/v1/model", "method": "GET", "headers": []}
    running = [asyncio.ensure_future(limit(dict(scope), receive, send)) for _ in range(2)]
    await asyncio.sleep(0)
    await limit(dict(scope), receive, send)  # the third is refused at once
    assert sent[0]["status"] == 503
    healthz = asyncio.ensure_future(limit({**scope, "path": "/healthz"}, receive, send))
    await asyncio.sleep(0)
    assert not healthz.done()  # /healthz is not refused (it waits on the same slow app here)
    release.set()
    await asyncio.gather(*running, healthz)
    assert limit.active == 0


_SLOW_HEAD = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
              b"Content-Length: 5000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
              b"filename=\"x.png\"\r\n\r\n\x89PNG")


def _answer(sock: socket.socket, wait: float = 20) -> bytes:
    sock.settimeout(wait)
    answer = b""
    try:
        while b'"error"' not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    except (TimeoutError, socket.timeout):
        pass
    return answer


@pytest.mark.timeout(45)
def test_a_body_sent_a_byte_a_second_is_cut_by_the_minimum_rate(app, monkeypatch):
    """Before: only the 60 s body deadline applied, so 1-byte/s bodies held the request slots for 60 s."""
    import threading

    import chestxray.serve as serve_module

    monkeypatch.setattr(serve_module, "BODY_GRACE_S", 0.5, raising=False)
    monkeypatch.setattr(serve_module, "MIN_BODY_RATE", 10_000, raising=False)
    with background_server(app) as url:
        sock = _connect(url)
        sock.sendall(_SLOW_HEAD)
        stop = threading.Event()

        def drip() -> None:
            while not stop.is_set():
                try:
                    sock.sendall(b"x")
                except OSError:
                    return
                stop.wait(0.2)

        threading.Thread(target=drip, daemon=True).start()
        answer = _answer(sock, 40)
        stop.set()
        assert answer.startswith(b"HTTP/1.1 408") and b"upload slower than 9 kB/s after 0.5 s" in answer, answer
        sock.close()
        _answers_everyone_else(url)


def test_one_address_cannot_take_every_request_slot(predictor):
    """Before: 75 slow bodies from 3 addresses took all 64 slots and an honest client got 0 of 93."""
    app = create_app(predictor, api_key="", max_active_per_client=2)
    with background_server(app) as url:
        slow = [_connect(url, "127.0.0.7") for _ in range(3)]
        for sock in slow[:2]:
            sock.sendall(_SLOW_HEAD)  # each holds a request slot until the body deadline
        time.sleep(0.3)
        slow[2].sendall(_SLOW_HEAD)
        answer = _answer(slow[2])
        assert answer.startswith(b"HTTP/1.1 503") and b"too many requests from your address" in answer, answer
        _answers_everyone_else(url)  # another address still has capacity
        for sock in slow:
            sock.close()


def test_head_is_answered_wherever_get_is(app):
    with background_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for path in ("/healthz", "/v1/model", "/", "/metrics", "/v1/model/card"):
            get, head = client.get(path), client.head(path)
            assert head.status_code == get.status_code == 200, path
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]
        assert client.head("/v1/predict").status_code == 405


def test_a_client_that_hangs_up_mid_upload_is_one_log_line(app, caplog):
    """Before: 68 log lines (a ClientDisconnect traceback) per aborted upload."""
    import logging

    caplog.set_level(logging.INFO)
    with background_server(app) as url:
        sock = _connect(url)
        sock.sendall(_SLOW_HEAD)
        time.sleep(0.3)
        sock.close()
        deadline = time.monotonic() + 20
        while not any("hung up during its upload" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.1)
        _answers_everyone_else(url)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("args", [["serve", "B", "--port", "99999"], ["listen", "B", "--port", "141211"],
                                  ["serve", "B", "--max-upload-mb", "-1"], ["listen", "B", "--max-dataset-mb", "0"]])
def test_numeric_options_out_of_range_are_refused_before_anything_runs(args, tmp_path):
    from typer.testing import CliRunner

    from chestxray.cli import app as cli

    result = CliRunner().invoke(cli, [args[0], str(tmp_path), *args[2:]])
    assert result.exit_code == 2 and "Invalid value for" in result.output and "Traceback" not in result.output
