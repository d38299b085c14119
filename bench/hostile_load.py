"""A bounded hostile-load run on loopback: ``chestxray serve`` (default limits) while hostile clients
hold idle and slow-header connections, and one address opens more than its cap; meanwhile an honest
client calls ``/healthz`` and ``POST /v1/predict`` with a real chest X-ray.

    PYTHONPATH=src python bench/hostile_load.py [--idle 200 --slow 100 --seconds 20]

Measures the honest client's answers (status counts, latency) with and without the hostile
connections, how many hostile connections the server held, refused and closed, and when it closed
them (the header deadline). Loopback only (127.0.0.0/8: each hostile group has its own address).
Writes ``bench/results/hostile-load-<date>.json``. A tiny random-weights model answers: the figures
are about the server, not the model; CPU-shared machines: see ``machine.load_average_1min``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import DATA, save_result  # noqa: E402

SERVER = ("import sys; from chestxray.serve import serve; "
          "serve(sys.argv[1], port=int(sys.argv[2]), backend='torch', threads=1, log_level='warning')")
IMAGE = DATA / "dicom_samples" / "nih_00000001_000.png"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


class Watcher(threading.Thread):
    """Notes when the server closes each of ``socks`` (EOF or reset), from ``start``."""

    def __init__(self, socks: list[socket.socket], start: float, dribble: bool = False) -> None:
        super().__init__(daemon=True)
        self.socks, self.start_time, self.dribble = socks, start, dribble
        self.closed_at: dict[int, float] = {}
        self.stop = False

    def run(self) -> None:
        import select

        byte = 0
        while not self.stop and len(self.closed_at) < len(self.socks):
            open_socks = [s for i, s in enumerate(self.socks) if i not in self.closed_at]
            readable, _, _ = select.select(open_socks, [], [], 0.5)
            for sock in readable:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self.closed_at[self.socks.index(sock)] = time.monotonic() - self.start_time
            if self.dribble:  # a slow-header client: one more header byte every half second
                byte += 1
                for i, sock in enumerate(self.socks):
                    if i not in self.closed_at:
                        try:
                            sock.send(b"X-Slow: %d\r\n" % byte if byte % 8 == 0 else b"a")
                        except OSError:
                            self.closed_at.setdefault(i, time.monotonic() - self.start_time)


def honest_client(url: str, seconds: float, image: bytes) -> dict:
    statuses: dict[str, int] = {}
    latencies: dict[str, list[float]] = {"healthz": [], "predict": []}
    errors: list[str] = []
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < end:
            for kind in ("healthz", "predict"):
                start = time.perf_counter()
                try:
                    if kind == "healthz":
                        response = client.get("/healthz")
                    else:
                        response = client.post("/v1/predict", files={"file": ("x.png", image, "image/png")})
                    statuses[f"{kind} {response.status_code}"] = statuses.get(f"{kind} {response.status_code}", 0) + 1
                    latencies[kind].append((time.perf_counter() - start) * 1000)
                except httpx.HTTPError as err:
                    errors.append(f"{kind}: {type(err).__name__}: {err}"[:200])
    summary = {"statuses": statuses, "errors": len(errors), "error_examples": errors[:5]}
    for kind, values in latencies.items():
        if values:
            summary[f"{kind}_ms_median"] = round(statistics.median(values), 1)
            summary[f"{kind}_ms_p95"] = round(sorted(values)[int(0.95 * (len(values) - 1))], 1)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=200, help="Idle connections (20 per address).")
    parser.add_argument("--slow", type=int, default=100, help="Slow-header connections (20 per address).")
    parser.add_argument("--over-cap", type=int, default=40, help="Connections from one address (cap: 32).")
    parser.add_argument("--seconds", type=float, default=20.0, help="Honest traffic per phase.")
    args = parser.parse_args()

    from factories import make_bundle

    from chestxray.serving.serve import HEADER_TIMEOUT_S, MAX_CONNECTIONS_PER_CLIENT

    image = IMAGE.read_bytes()
    bundle = make_bundle(Path(tempfile.mkdtemp(prefix="hostile-bundle-")))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CHESTXRAY_ALLOCATOR": "system"}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(bundle), str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
        baseline = honest_client(url, args.seconds, image)

        start = time.monotonic()
        idle = [connect(port, f"127.0.0.{2 + i // 20}") for i in range(args.idle)]
        slow = [connect(port, f"127.0.1.{2 + i // 20}") for i in range(args.slow)]
        for sock in slow:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
        crowd = []
        for _ in range(args.over_cap):
            crowd.append(connect(port, "127.0.2.2"))
            time.sleep(0.01)  # in order: the server counts the address's open connections at each
        watchers = [Watcher(idle, start), Watcher(slow, start, dribble=True), Watcher(crowd, start)]
        for watcher in watchers:
            watcher.start()
        time.sleep(0.5)
        attack_start = time.monotonic() - start
        # within the header deadline, so that every hostile connection under the caps is held throughout
        under_attack = honest_client(url, min(args.seconds, HEADER_TIMEOUT_S - 1.5 - attack_start), image)
        attack_end = time.monotonic() - start
        held_during = {name: len(w.socks) - sum(t < attack_end for t in w.closed_at.values())
                       for name, w in zip(("idle", "slow_header", "one_address"), watchers)}
        time.sleep(max(0.0, HEADER_TIMEOUT_S + 3 - (time.monotonic() - start)))
        for watcher in watchers:
            watcher.stop = True
            watcher.join(2)
        after = honest_client(url, 3, image)

        def closed(watcher: Watcher, total: int) -> dict:
            times = sorted(watcher.closed_at.values())
            return {"total": total, "closed": len(times),
                    "closed_after_s_min": round(times[0], 2) if times else None,
                    "closed_after_s_max": round(times[-1], 2) if times else None}

        record = {
            "limits": {"header_timeout_s": HEADER_TIMEOUT_S, "max_connections_per_client": MAX_CONNECTIONS_PER_CLIENT},
            "hostile": {"idle": closed(watchers[0], args.idle), "slow_header": closed(watchers[1], args.slow),
                        "one_address": {**closed(watchers[2], args.over_cap),
                                        "refused_at_once": sum(t < attack_start for t in watchers[2].closed_at.values())}},
            "held_while_honest_traffic_ran": held_during,
            "honest_traffic_under_attack_s": [round(attack_start, 2), round(attack_end, 2)],
            "honest_without_attack": baseline, "honest_under_attack": under_attack, "honest_after": after,
            "seconds_per_phase": args.seconds, "command": " ".join(sys.argv), "network": "loopback only",
        }
        for sock in idle + slow + crowd:
            sock.close()
    finally:
        server.terminate()
        server.wait(30)
    path = save_result("hostile-load", record)
    print(record)
    print(path)


if __name__ == "__main__":
    main()
