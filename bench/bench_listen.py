""".venv/bin/python bench/bench_listen.py [BUNDLE] [--images 60] [--sequential 20]

Throughput and latency of ``chestxray listen`` with a real PACS: images per second from C-STORE to
the structured report stored in Orthanc, and the latency from C-STORE answered (the instance is
spooled) to its SR stored in Orthanc, p50 and p99.

A real Orthanc (Debian's, ``make pacs``) runs on free loopback ports; ``chestxray listen`` runs as
its own process through the command line (so with the project's default allocator and backend:
ONNX when the bundle has model.onnx, else torch), sending to Orthanc. The real DICOMs of ``dicom_samples`` are sent as a modality would,
each copy with a new SOP Instance UID: ``--images`` back to back on one association (burst: the
throughput, and latency including queueing), then ``--sequential`` one at a time, waiting for each
report (latency of one image on an idle node). Reports appear in Orthanc are found by polling its
``/changes`` every 20 ms. Without BUNDLE a bundle of the default architecture and image size with
random weights is built (speed does not depend on the weights). The machine's load average is
recorded: figures taken while other work shares the cores say so.
Writes ``bench/results/listen-<date>-<time>.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import DATA, machine, save_result  # noqa: E402
from orthanc import AE_TITLE, Orthanc, free_port  # noqa: E402

from chestxray.model.bundle import BundleMeta, read_meta, save_bundle  # noqa: E402
from chestxray.training.config import TrainConfig  # noqa: E402
from chestxray.dicom.dicomresult import result_uid  # noqa: E402
from chestxray.deploy.export import export_onnx  # noqa: E402
from chestxray.model.models import create_model  # noqa: E402

POLL_S = 0.02
START_TIMEOUT_S = 180


def default_bundle(folder: Path) -> Path:
    """The default architecture and image size with random weights, exported to ONNX as `train` does."""
    config = TrainConfig()
    model = create_model(config.arch, 4, weights="none").eval()
    meta = BundleMeta(classes=["covid19", "normal", "viral_pneumonia", "bacterial_pneumonia"],
                      image_size=config.image_size, preprocess=config.preprocessing().options())
    save_bundle(folder, model, meta)
    export_onnx(folder)
    return folder


class ReportWatcher:
    """SOP Instance UIDs of new instances in Orthanc with the time each was first seen."""

    def __init__(self, pacs: Orthanc) -> None:
        self.pacs = pacs
        self.since = pacs.get("/changes?last")["Last"]
        self.seen: dict[str, float] = {}

    def poll(self) -> None:
        changes = self.pacs.get(f"/changes?since={self.since}&limit=1000")
        now = time.perf_counter()
        for change in changes["Changes"]:
            if change["ChangeType"] == "NewInstance":
                uid = self.pacs.get(f"/instances/{change['ID']}")["MainDicomTags"]["SOPInstanceUID"]
                self.seen.setdefault(uid, now)
        self.since = changes["Last"]

    def wait_for(self, uids: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not uids <= set(self.seen):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(uids - set(self.seen))} report(s) never reached Orthanc")
            self.poll()
            time.sleep(POLL_S)


def copies(sources: list[pydicom.Dataset], n: int) -> list[pydicom.Dataset]:
    out = []
    for i in range(n):
        ds = copy.deepcopy(sources[i % len(sources)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out.append(ds)
    return out


def send(port: int, datasets: list[pydicom.Dataset], sent: dict[str, float]) -> None:
    ae = AE(ae_title="BENCH")
    for context in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(context[0], [context[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title="CHESTXRAY")
    if not assoc.is_established:
        raise RuntimeError("chestxray listen refused the association")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0:
                raise RuntimeError(f"C-STORE status {status}")
            sent[ds.SOPInstanceUID] = time.perf_counter()
    finally:
        assoc.release()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(latencies: list[float]) -> dict[str, float]:
    return {"n": len(latencies), "p50_ms": round(percentile(latencies, 50) * 1000, 1),
            "p99_ms": round(percentile(latencies, 99) * 1000, 1), "mean_ms": round(statistics.mean(latencies) * 1000, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--sequential", type=int, default=20)
    args = parser.parse_args()
    sources = [pydicom.dcmread(f) for f in sorted((DATA / "dicom_samples").glob("*.dcm"))]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = args.bundle or default_bundle(tmp / "bundle")
        model_id = read_meta(bundle).model_id
        backend = "onnx" if (Path(bundle) / "model.onnx").is_file() else "torch"
        port = free_port()
        pacs = Orthanc(tmp / "orthanc").start()
        listener = subprocess.Popen(
            [sys.executable, "-m", "chestxray.cli", "listen", str(bundle), "--port", str(port),
             "--dest", f"{AE_TITLE}@127.0.0.1:{pacs.dicom_port}", "--spool", str(tmp / "spool"),
             "--audit-log", str(tmp / "audit.jsonl")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            load_before = os.getloadavg()
            _wait_listening(port)
            watcher = ReportWatcher(pacs)
            warm = copies(sources, 3)  # first inferences pay for lazy initialisation
            send(port, warm, {})
            watcher.wait_for({result_uid("sr", d.SOPInstanceUID, model_id) for d in warm}, START_TIMEOUT_S)

            burst, sent = copies(sources, args.images), {}
            start = time.perf_counter()
            send(port, burst, sent)
            expected = {result_uid("sr", d.SOPInstanceUID, model_id): d.SOPInstanceUID for d in burst}
            watcher.wait_for(set(expected), 600)
            elapsed = max(watcher.seen[uid] for uid in expected) - start
            burst_latency = [watcher.seen[sr] - sent[src] for sr, src in expected.items()]

            single_latency = []
            for ds in copies(sources, args.sequential):
                one: dict[str, float] = {}
                send(port, [ds], one)
                sr = result_uid("sr", ds.SOPInstanceUID, model_id)
                watcher.wait_for({sr}, 120)
                single_latency.append(watcher.seen[sr] - one[ds.SOPInstanceUID])
            load_after = os.getloadavg()
        finally:
            listener.terminate()
            listener.wait(timeout=60)
            pacs.stop()
    record = {
        "bundle": str(args.bundle) if args.bundle else "default architecture, random weights",
        "model_id": model_id, "images": args.images, "sources": [f.name for f in sorted((DATA / "dicom_samples").glob("*.dcm"))],
        "images_per_s": round(args.images / elapsed, 2), "burst_latency": summary(burst_latency),
        "sequential_latency": summary(single_latency),
        "latency_is": "C-STORE response received by the sender (instance spooled) -> SR seen in Orthanc (20 ms polls)",
        "load_average_before": [round(v, 2) for v in load_before], "load_average_after": [round(v, 2) for v in load_after],
        "backend": backend, "allocator": _allocator(),
        "shared_cpu": load_before[0] > 1.5 or load_after[0] > 2.5,
    }
    path = save_result("listen", record)
    print(f"{record['images_per_s']} images/s; burst p50 {record['burst_latency']['p50_ms']} ms, "
          f"p99 {record['burst_latency']['p99_ms']} ms; one at a time p50 {record['sequential_latency']['p50_ms']} ms, "
          f"p99 {record['sequential_latency']['p99_ms']} ms; load {record['load_average_before'][0]} "
          f"(machine: {machine()['cores']} cores) -> {path}")


def _allocator() -> str:
    """The allocator the listen process runs on (the CLI re-executes itself onto it)."""
    from chestxray.allocator import ENV, find_library

    choice = os.environ.get(ENV, "tcmalloc")
    library = None if choice == "system" else find_library(choice)
    return str(library) if library else "system (glibc)"


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        ae = AE(ae_title="BENCH")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="CHESTXRAY")
        if assoc.is_established:
            assoc.send_c_echo()
            assoc.release()
            return
        time.sleep(0.5)
    raise RuntimeError("chestxray listen did not start")


if __name__ == "__main__":
    main()
