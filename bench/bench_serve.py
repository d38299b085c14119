""".venv/bin/python bench/bench_serve.py BUNDLE [--data FOLDER] [--clients 8] [--requests 25]

Load test of ``chestxray serve`` on loopback: concurrent clients posting real X-rays, both backends.

The bundle is copied to a temporary folder and exported to ONNX there (the original is not touched);
for each backend a real uvicorn server runs in its own process (``chestxray.serve.serve``) and
``--clients`` threads each send ``--requests`` uploads (files cycled, as multipart). Reports
requests/s, p50/p99 latency seen by the clients, the server's own latency and the error count
(which must be 0). Writes ``bench/results/serve-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402

from chestxray.deploy.export import export_onnx  # noqa: E402
from chestxray.inference.predict import expand_inputs  # noqa: E402

START_TIMEOUT_S = 120
WARM_UP = 3
SERVER = "import sys; from chestxray.serve import serve; serve(sys.argv[1], port=int(sys.argv[2]), " \
         "backend=sys.argv[3], threads=int(sys.argv[4]) or None, log_level='warning')"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(bundle: Path, backend: str, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(bundle), str(port), backend, str(threads)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {backend} server exited with code {process.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the {backend} server did not answer within {START_TIMEOUT_S} s")


def client_session(url: str, uploads: list[tuple[str, bytes]], offset: int, requests: int) -> list[dict]:
    """One client: ``requests`` sequential uploads on one connection."""
    records = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for i in range(requests):
            name, data = uploads[(offset + i) % len(uploads)]
            start = time.perf_counter()
            try:
                response = http.post("/v1/predict", files={"file": (name, data)})
                ok = response.status_code == 200
                server_ms = response.json().get("latency_ms") if ok else None
                status = response.status_code
            except httpx.HTTPError as err:
                ok, server_ms, status = False, None, type(err).__name__
            records.append({"ms": 1000 * (time.perf_counter() - start), "ok": ok, "status": status,
                            "server_ms": server_ms})
    return records


def load_test(url: str, uploads: list[tuple[str, bytes]], clients: int, requests: int) -> dict:
    client_session(url, uploads, 0, WARM_UP)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        sessions = pool.map(lambda c: client_session(url, uploads, c * requests, requests), range(clients))
        records = [record for session in sessions for record in session]
    seconds = time.perf_counter() - start
    latencies = sorted(r["ms"] for r in records)
    server = [r["server_ms"] for r in records if r["server_ms"] is not None]
    errors = [r["status"] for r in records if not r["ok"]]
    return {"requests": len(records), "seconds": round(seconds, 2), "requests_per_s": round(len(records) / seconds, 2),
            "p50_ms": round(statistics.median(latencies), 1),
            "p99_ms": round(statistics.quantiles(latencies, n=100, method="inclusive")[-1], 1),
            "max_ms": round(latencies[-1], 1),
            "server_latency_p50_ms": round(statistics.median(server), 1) if server else None,
            "errors": len(errors), "error_statuses": sorted(set(map(str, errors)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path, help="model bundle folder")
    parser.add_argument("--data", type=Path, default=DATA / "chest_xray_4class" / "test",
                        help="folder of real X-rays to upload")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=("torch", "onnx"))
    parser.add_argument("--threads", type=int, nargs="+", default=[0],
                        help="compute threads of the server (0: its default); several values are each measured")
    args = parser.parse_args()
    files = [Path(f) for f, error in expand_inputs([args.data]) if error is None]
    uploads = [(f.name, f.read_bytes()) for f in files]
    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        bundle = Path(shutil.copytree(args.bundle, Path(scratch) / "bundle"))
        if "onnx" in args.backends:
            export_onnx(bundle, parity_images=files[:4])
        for threads in args.threads:
            for backend in args.backends:
                name = backend if threads == 0 else f"{backend}, {threads} thread(s)"
                process, url = start_server(bundle, backend, threads)
                try:
                    results[name] = load_test(url, uploads, args.clients, args.requests)
                finally:
                    process.send_signal(signal.SIGINT)
                    process.wait(timeout=30)
                print(name, json.dumps(results[name]))
    record = {
        "bundle": str(args.bundle), "data": str(args.data), "files": len(uploads),
        "upload_mean_kib": round(statistics.mean(len(d) for _, d in uploads) / 1024, 1),
        "clients": args.clients, "requests_per_client": args.requests, "results": results,
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
    }
    out = save_result("serve", record)
    print(f"load average {record['load_average_before']} -> {record['load_average_after']} on {os.cpu_count()} "
          f"cores, clients and server on the same machine; wrote {out}")
    if any(r["errors"] for r in results.values()):
        raise SystemExit("errors during the load test")


if __name__ == "__main__":
    main()
