"""``chestxray serve --workers 2`` under the floods (issue 28): the limits live in each worker process.

An honest client still gets its predictions while slow bodies from three addresses drip a byte a second
(each worker cuts them by the minimum body rate, 408); and the per-address connection cap is counted by
each worker for the connections it accepted, so one address holds at most ``workers x cap`` connections
(docs/enforced-limits.md says so).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from factories import make_bundle, png_bytes
from hostile import SlowBodies, closed_by_server, connect
from orthanc import free_port

WORKERS, CAP = 2, 12


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    bundle = make_bundle(tmp_path_factory.mktemp("bundle") / "b")
    port = free_port()
    command = [sys.executable, "-c", "from chestxray.cli import run; run()", "serve", str(bundle), "--port", str(port),
               "--workers", str(WORKERS), "--threads", "1", "--backend", "torch",
               "--max-connections-per-client", str(CAP), "--no-audit"]
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "CHESTXRAY_ALLOCATOR": "system"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:  # each worker logs its startup once its app (and model) is up
        log.seek(0)
        started = log.read().count("Application startup complete")
        if started >= WORKERS:
            break
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            log.seek(0)
            pytest.fail(f"serve --workers {WORKERS} did not start: {log.read()[-2000:]}")
        time.sleep(0.5)
    assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200
    yield port, url
    server.terminate()
    server.wait(60)
    log.close()


def _predict(client: httpx.Client) -> int:
    return client.post("/v1/predict", files={"file": ("x.png", png_bytes(), "image/png")}).status_code


@pytest.mark.slow  # starts two server processes, floods them for seconds
@pytest.mark.timeout(300)
def test_an_honest_client_is_answered_during_a_slow_body_flood_and_every_worker_cuts_slow_bodies(two_workers):
    port, url = two_workers
    flood = SlowBodies(port, ["127.0.3.2", "127.0.3.3", "127.0.3.4"], 10, reconnect=True)
    flood.start()
    try:
        time.sleep(0.5)
        assert flood.held() >= 20  # the flood holds its connections (within the caps)
        with httpx.Client(base_url=url, timeout=30) as client:
            statuses = [_predict(client) for _ in range(6)]
            statuses.append(client.get("/healthz").status_code)
        deadline = time.monotonic() + 60
        while sum(status == 408 for status, _ in flood.events) < 30 and time.monotonic() < deadline:
            time.sleep(0.5)  # the first round of slow bodies is cut after the grace, in both workers
    finally:
        flood.stop_flood()
    assert statuses == [200] * 7, statuses
    cut = [seconds for status, seconds in flood.events if status == 408]
    assert len(cut) >= 30, flood.summary()  # every slow body of the first round, whichever worker held it
    assert not [s for s, _ in flood.events if s not in (408, 503)], flood.summary()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_per_address_cap_holds_in_each_worker_at_most_workers_times_the_cap_in_all(two_workers):
    port, url = two_workers
    socks = [connect(port, "127.0.0.9") for _ in range(3 * CAP)]
    try:
        time.sleep(0.5)
        refused = [sock for sock in socks if closed_by_server(sock, 0.3)]  # the 503 comes at once; held ones wait
        held = len(socks) - len(refused)
        assert CAP <= held <= WORKERS * CAP, (held, len(refused))
        with httpx.Client(base_url=url, timeout=30) as client:
            assert _predict(client) == 200  # another address is served meanwhile
    finally:
        for sock in socks:
            sock.close()
