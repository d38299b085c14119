"""The DICOM-network modes of ``bench/hostile_load.py`` (loopback only; the hostile peers are in
``tests/hostile.py``, shared with the tests):

- ``dicomweb``: the WADO-RS reader against hostile servers (an endless stream, silence, a dripped head
  or body, HTML, junk multipart): time to refuse, the message, peak RSS of this process;
- ``cstore``: a ``listen`` process (small limits: ``--max-dataset-mb``) receiving oversized and garbage
  datasets from other addresses while an honest modality sends small X-rays: the statuses, time to
  refuse, the listener's peak RSS, the honest sender's success rate;
- ``associations``: idle TCP sockets and idle associations from ``--addresses`` addresses (up to the
  per-address cap each) while the honest modality sends: its success rate, and when the hogs were closed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

LISTENER = ("import json, sys\n"
            "from chestxray.listen import ListenConfig, Listener\n"
            "from chestxray.predict import load_model\n"
            "listener = Listener(load_model(sys.argv[1], backend='torch'), ListenConfig(**json.loads(sys.argv[2])))\n"
            "listener.start()\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n"
            "listener.stop()\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dicomweb, cstore and associations modes")
    group.add_argument("--timeout", type=float, default=10.0, help="dicomweb: the reader's total deadline (s).")
    group.add_argument("--limit-mb", type=int, default=64, help="dicomweb: the answer size limit (MiB).")
    group.add_argument("--max-dataset-mb", type=int, default=8, help="cstore: the listener's dataset limit.")
    group.add_argument("--oversize", type=int, default=4, help="cstore: oversized datasets sent (3x the limit).")
    group.add_argument("--network-timeout", type=float, default=5.0,
                       help="associations: the listener's ACSE and network timeouts (s).")
    group.add_argument("--per-address", type=int, default=16, help="associations: hogs per hostile address.")


def dicomweb_mode(args: argparse.Namespace) -> dict:
    from hostile import answers, drips, http_server, multipart, peak_rss_mb, silent, streams_forever

    import chestxray.dicomweb as dicomweb
    from chestxray.errors import ChestXrayError

    servers = {"endless stream": streams_forever(), "silence": silent(), "dripped head": drips(False, 0.2),
               "dripped body": drips(True, 0.2), "html": answers(b"<html><body>Login</body></html>", "text/html"),
               "junk multipart": answers(os.urandom(1 << 20)),
               "non-DICOM parts": answers(multipart(("application/dicom", os.urandom(4096)),
                                                    ("application/json", b"{}")))}
    cases = {}
    for name, answer in servers.items():
        with http_server(answer) as url:
            start = time.perf_counter()
            try:
                instances, failed = dicomweb.retrieve_study(url, "1.2.3", limit=args.limit_mb << 20,
                                                            timeout=args.timeout)
                outcome = f"{len(instances)} instances, {len(failed)} failed parts: " + \
                          "; ".join(reason for _, reason in failed)[:300]
            except ChestXrayError as err:
                outcome = str(err)
            cases[name] = {"refused_after_s": round(time.perf_counter() - start, 2), "outcome": outcome,
                           "one_line": "\n" not in outcome, "peak_rss_mb_so_far": peak_rss_mb()}
    return {"settings": {"timeout_s": args.timeout, "limit_mb": args.limit_mb}, "cases": cases}


class Listen:
    """A ``listen`` process of a tiny bundle on a free port with ``settings`` (ListenConfig fields)."""

    def __init__(self, **settings) -> None:
        from factories import make_bundle
        from orthanc import free_port

        work = Path(tempfile.mkdtemp(prefix="hostile-listen-"))
        bundle = make_bundle(work / "bundle", ["normal", "pneumonia", "covid19"])
        self.port = free_port()
        config = {"spool": str(work / "spool"), "port": self.port, **settings}
        self.process = subprocess.Popen([sys.executable, "-c", LISTENER, str(bundle), json.dumps(config)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "CHESTXRAY_ALLOCATOR": "system"})
        if self.process.stdout.readline().strip() != "ready":
            raise SystemExit("the listener did not start")

    def peak_rss_mb(self) -> float:
        line = next(x for x in Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
                    if x.startswith("VmHWM"))
        return round(int(line.split()[1]) / 1024, 1)

    def rss_mb(self) -> float:
        line = next(x for x in Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
                    if x.startswith("VmRSS"))
        return round(int(line.split()[1]) / 1024, 1)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Honest(threading.Thread):
    """A modality sending one small X-ray per association, again and again, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.results = port, []
        self.stop = threading.Event()

    def run(self) -> None:
        from dicomnet import send, xray_dataset

        seed = 100
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                status = send(self.port, [xray_dataset(seed=seed)])[0]
            except Exception as err:  # noqa: BLE001 (a figure: whatever the sender met)
                status = type(err).__name__
            self.results.append((status, (time.perf_counter() - start) * 1000))
            seed += 1
            self.stop.wait(0.2)

    def summary(self) -> dict:
        ok = [ms for status, ms in self.results if status == 0]
        return {"sent": len(self.results), "success": len(ok),
                "success_rate": round(len(ok) / len(self.results), 3) if self.results else None,
                "ms_median": round(statistics.median(ok), 1) if ok else None,
                "others": sorted({str(s) for s, _ in self.results if s != 0})}


def _send_from(port: int, source: str, datasets: list) -> list:
    from pynetdicom import AE

    ae = AE(ae_title="HOSTILE")
    ae.maximum_pdu_size = 0
    for ds in datasets:
        ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="CHESTXRAY", bind_address=(source, 0))
    if not assoc.is_established:
        return ["no association"] * len(datasets)
    try:
        out = []
        for ds in datasets:
            start = time.perf_counter()
            status = getattr(assoc.send_c_store(ds), "Status", None)
            out.append((None if status is None else f"0x{status:04X}", round(time.perf_counter() - start, 2)))
        return out
    finally:
        assoc.release()


def garbage_datasets() -> dict:
    """Datasets a parser chokes on: junk JPEG pixel data, pixel data shorter than the header says, a
    header claiming a 65535x65535 image, random bytes as the pixel data of a 12-bit image."""
    import numpy as np
    from dicomnet import xray_dataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    jpeg = xray_dataset(seed=1)
    jpeg.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    jpeg.PixelData = encapsulate([b"\xff\xd8\xff\xe0garbage" * 50])
    jpeg["PixelData"].VR = "OB"
    short = xray_dataset(seed=2)
    short.PixelData = short.PixelData[:100]
    huge = xray_dataset(seed=3)
    huge.Rows = huge.Columns = 65535
    random12 = xray_dataset(seed=4)
    random12.BitsAllocated, random12.BitsStored, random12.HighBit = 16, 12, 11
    random12.PixelData = np.random.default_rng(0).integers(0, 65535, 64 * 64, dtype=np.uint16).tobytes()
    return {"junk jpeg": jpeg, "short pixel data": short, "65535x65535 header": huge, "random 12-bit": random12}


def cstore_mode(args: argparse.Namespace) -> dict:
    import numpy as np
    from dicomnet import xray_dataset

    limit = args.max_dataset_mb << 20
    node = Listen(max_dataset_bytes=limit)
    try:
        honest = Honest(node.port)
        honest.start()
        time.sleep(2)
        rss_start = node.rss_mb()
        side = int((3 * limit) ** 0.5)
        oversize = []
        for i in range(args.oversize):
            big = xray_dataset(seed=10 + i)
            big.Rows = big.Columns = side
            big.PixelData = np.random.default_rng(i).integers(0, 255, side * side, dtype=np.uint8).tobytes()
            oversize += _send_from(node.port, f"127.0.4.{2 + i}", [big])
        garbage = {name: _send_from(node.port, "127.0.4.100", [ds])[0] for name, ds in garbage_datasets().items()}
        time.sleep(3)
        honest.stop.set()
        honest.join(30)
        record = {"settings": {"max_dataset_bytes": limit, "oversize_bytes_each": side * side},
                  "oversize": [{"status": s, "answered_after_s": t} for s, t in oversize],
                  "garbage": {name: {"status": s, "answered_after_s": t} for name, (s, t) in garbage.items()},
                  "honest": honest.summary(), "listener_rss_mb_before_flood": rss_start,
                  "listener_rss_mb_after": node.rss_mb(), "listener_peak_rss_mb": node.peak_rss_mb()}
    finally:
        node.close()
    return record


def associations_mode(args: argparse.Namespace) -> dict:
    from hostile import closed_by_server, connect
    from pynetdicom import AE

    wait = args.network_timeout
    node = Listen(acse_timeout_s=wait, network_timeout_s=wait)
    try:
        honest = Honest(node.port)
        honest.start()
        time.sleep(2)
        before = honest.summary()
        start = time.monotonic()
        sources = [f"127.0.5.{2 + i}" for i in range(args.addresses)]
        sockets = [connect(node.port, source) for source in sources for _ in range(args.per_address // 2)]
        associations = []
        for source in sources:
            for _ in range(args.per_address - args.per_address // 2):
                ae = AE(ae_title="IDLE")
                ae.add_requested_context("1.2.840.10008.1.1")
                associations.append(ae.associate("127.0.0.1", node.port, ae_title="CHESTXRAY",
                                                 bind_address=(source, 0)))
        opened = sum(a.is_established for a in associations)
        held_after = round(time.monotonic() - start, 2)
        extra = connect(node.port, sources[0])  # one more from a full address
        refused_at_once = closed_by_server(extra, 1.0)
        honest.results.clear()
        closed_at: dict[int, float] = {}

        def watch(i, sock):
            if closed_by_server(sock, 4 * wait + 10):
                closed_at[i] = round(time.monotonic() - start, 2)

        watchers = [threading.Thread(target=watch, args=(i, s), daemon=True) for i, s in enumerate(sockets)]
        for thread in watchers:
            thread.start()
        time.sleep(wait + 5)
        established = sum(a.is_established for a in associations)
        for thread in watchers:
            thread.join(4 * wait + 10)
        honest.stop.set()
        honest.join(30)
        times = sorted(closed_at.values())
        record = {"settings": {"acse_timeout_s": wait, "network_timeout_s": wait, "max_per_address": 16,
                               "max_associations": 64},
                  "hostile": {"addresses": args.addresses, "idle_sockets": len(sockets),
                              "idle_associations": len(associations),
                              "associations_established": opened,
                              "associations_still_open_after_timeout_plus_5_s": established,
                              "sockets_closed": len(times), "sockets_closed_after_s_min": times[0] if times else None,
                              "sockets_closed_after_s_max": times[-1] if times else None,
                              "all_hogs_open_after_s": held_after,
                              "connection_beyond_the_address_cap_closed_at_once": refused_at_once},
                  "honest_before": before, "honest_during": honest.summary()}
        extra.close()
        for sock in sockets:
            sock.close()
    finally:
        node.close()
    return record


MODES = {"dicomweb": dicomweb_mode, "cstore": cstore_mode, "associations": associations_mode}
