"""A bounded hostile-load run on loopback, one ``--mode`` at a time:

- ``headers`` (default): ``chestxray serve`` (default limits) while hostile clients hold idle and
  slow-header connections, and one address opens more than its cap; meanwhile an honest client calls
  ``/healthz`` and ``POST /v1/predict`` with a real chest X-ray;
- ``slow-body``: the same server (``--workers N`` processes) while ``--slow-bodies`` uploads from
  ``--addresses`` addresses send their bodies a byte a second;
- ``dicomweb``, ``cstore``, ``associations``: hostile DICOMweb servers against the WADO-RS reader,
  oversized and garbage C-STOREs and idle sockets and associations against ``listen``
  (``bench/hostile_net.py``).

    PYTHONPATH=src python bench/hostile_load.py [--idle 200 --slow 100 --seconds 20]
    PYTHONPATH=src python bench/hostile_load.py --mode slow-body --slow-bodies 75 --addresses 3 --workers 2

Measures the honest client's answers (status counts, latency) with and without the hostile
connections, how many hostile connections the server held, refused and closed, and when it closed
them (the header deadline). Loopback only (127.0.0.0/8: each hostile group has its own address).
Writes ``bench/results/hostile-load-<date>.json`` (``hostile-<mode>-<date>.json`` for the other modes). A tiny random-weights model answers: the figures
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
          "serve(sys.argv[1], port=int(sys.argv[2]), backend='torch', threads=1, log_level='warning', "
          "workers=int(sys.argv[3]))")
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


def start_server(workers: int) -> tuple[subprocess.Popen, str]:
    """``chestxray serve`` of a tiny bundle with ``workers`` processes on a free loopback port, answering."""
    from factories import make_bundle

    bundle = make_bundle(Path(tempfile.mkdtemp(prefix="hostile-bundle-")))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CHESTXRAY_ALLOCATOR": "system"}
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(bundle), str(port), str(workers)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            return server, url
        except httpx.HTTPError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("the server did not start")
            time.sleep(0.5)


def process_tree_peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of process ``pid`` plus its children, in MB."""
    total = 0
    pids = [pid] + [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for one in pids:
        try:
            line = next(x for x in Path(f"/proc/{one}/status").read_text().splitlines() if x.startswith("VmHWM"))
            total += int(line.split()[1])
        except (OSError, StopIteration):
            pass
    return round(total / 1024, 1)


def slow_body(args: argparse.Namespace) -> dict:
    """The honest client without, then during a slow-body flood against ``--workers`` server processes."""
    from hostile import SlowBodies

    from chestxray.serving.serve import BODY_GRACE_S, MAX_ACTIVE_PER_CLIENT, MIN_BODY_RATE

    image = IMAGE.read_bytes()
    server, url = start_server(args.workers)
    port = int(url.rsplit(":", 1)[1])
    try:
        baseline = honest_client(url, args.seconds, image)
        flood = SlowBodies(port, [f"127.0.3.{2 + i}" for i in range(args.addresses)],
                           args.slow_bodies // args.addresses, reconnect=True)  # a flood that lasts
        flood.start()
        time.sleep(0.5)
        held_at_start = flood.held()
        during = honest_client(url, args.seconds, image)
        held_at_end = flood.held()
        flood.stop_flood()
        summary = flood.summary()
        after = honest_client(url, 3, image)
        peak = process_tree_peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    return {"workers": args.workers, "limits": {"body_grace_s": BODY_GRACE_S, "min_body_rate_bytes_s": MIN_BODY_RATE,
                                                 "max_active_per_client_per_worker": MAX_ACTIVE_PER_CLIENT},
            "flood": {**summary, "addresses": args.addresses, "held_when_honest_traffic_began": held_at_start,
                      "held_when_it_ended": held_at_end, "bytes_per_second_each": 1,
                      "reopened_when_answered": True},
            "honest_without_attack": baseline, "honest_under_attack": during, "honest_after": after,
            "server_peak_rss_mb_all_processes": peak, "seconds_per_phase": args.seconds}


def other_mode(args: argparse.Namespace) -> None:
    if args.mode == "slow-body":
        record = slow_body(args)
    else:
        import hostile_net

        record = hostile_net.MODES[args.mode](args)
    record.update(command=" ".join(sys.argv), network="loopback only")
    path = save_result(f"hostile-{args.mode}", record)
    print(record)
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--idle", type=int, default=200, help="Idle connections (20 per address).")
    parser.add_argument("--slow", type=int, default=100, help="Slow-header connections (20 per address).")
    parser.add_argument("--over-cap", type=int, default=40, help="Connections from one address (cap: 32).")
    parser.add_argument("--seconds", type=float, default=20.0, help="Honest traffic per phase.")
    parser.add_argument("--mode", choices=("headers", "slow-body", "dicomweb", "cstore", "associations"),
                        default="headers")
    parser.add_argument("--workers", type=int, default=1, help="slow-body: server processes.")
    parser.add_argument("--slow-bodies", type=int, default=75, help="slow-body: uploads sent a byte a second.")
    parser.add_argument("--addresses", type=int, default=3, help="slow-body, associations: hostile addresses.")
    import hostile_net

    hostile_net.add_arguments(parser)
    args = parser.parse_args()

    from chestxray.serving.serve import HEADER_TIMEOUT_S, MAX_CONNECTIONS_PER_CLIENT

    if args.mode != "headers":
        return other_mode(args)
    image = IMAGE.read_bytes()
    server, url = start_server(1)
    port = int(url.rsplit(":", 1)[1])
    try:
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
