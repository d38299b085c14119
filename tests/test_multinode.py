"""Two "nodes" on one host: two torchrun launchers (``--nnodes 2``, 2 processes each) meeting at a c10d
rendezvous on 127.0.0.1, gloo on the CPU. What changes with several nodes: each node has its own cache
(node-local disk), the run folder and bundle are written once (by global rank 0, on whichever node that is),
sharded prediction spans both nodes, and a node killed mid-run ends the other with an error, not a hang."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from factories import make_bundle

pytestmark = pytest.mark.slow

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RUN = ["--image-size=64", "--epochs=2", "--freeze-epochs=1", "--batch-size=4", "--seed=0"]
RUN_ENTRIES = ["bundle", "checkpoints", "config.yaml", "curves.png", "environment.json", "logs", "metrics.csv",
               "split.csv"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(node: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    """One node's torchrun: 2 processes, c10d rendezvous on 127.0.0.1, no restarts, a join timeout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2", f"--node-rank={node}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=chestxray-test",
               "--rdzv-conf=join_timeout=120", "--max-restarts=0", *args]
    return subprocess.Popen(command, env=ONE_THREAD, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node's launcher and every process under it, as when the machine dies (torchrun's workers may
    sit in process groups of their own)."""
    tree, frontier = [node.pid], [node.pid]
    while frontier:
        children = subprocess.run(["pgrep", "-P", ",".join(map(str, frontier))], capture_output=True, text=True).stdout
        frontier = [int(pid) for pid in children.split()]
        tree += frontier
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_all(nodes: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    for node in nodes:
        try:
            node.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in nodes:
                kill_node(other)
            pytest.fail(f"a node still ran after {timeout:.0f} s: a hang")
    return [node.returncode for node in nodes]


@pytest.fixture
def subset(course_data: Path, tmp_path: Path) -> Path:
    """42 course images, normal vs COVID-19 (16 + 16 train, 5 + 5 validation)."""
    rows = []
    for label in ("normal", "covid19"):
        files = sorted((course_data / "train" / label).iterdir())[:21]
        rows += [{"path": str(f), "label": label, "split": "train" if i < 16 else "val"} for i, f in enumerate(files)]
    pd.DataFrame(rows).to_csv(tmp_path / "subset.csv", index=False)
    return tmp_path / "subset.csv"


def test_two_nodes_train_with_one_cache_per_node_and_one_run_folder(subset: Path, tmp_path: Path) -> None:
    port, logs = free_port(), [tmp_path / "node0.log", tmp_path / "node1.log"]
    # each node its own cache folder (a node-local disk) and its own --out: the run must appear in one only
    nodes = [launch(n, port, ["-m", "chestxray.cli", "train", str(subset), "--out", str(tmp_path / f"out{n}"),
                              "--name", "two", "--cache-dir", str(tmp_path / f"cache{n}"), *RUN], logs[n])
             for n in (0, 1)]
    codes = wait_all(nodes, 600)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    written = [n for n in (0, 1) if (tmp_path / f"out{n}" / "two").exists()]
    assert len(written) == 1, "the run folder is written by global rank 0 alone"
    run = tmp_path / f"out{written[0]}" / "two"
    assert sorted(p.name for p in run.iterdir()) == RUN_ENTRIES
    assert list(pd.read_csv(run / "metrics.csv")["epoch"]) == [1, 2]
    other = tmp_path / f"out{1 - written[0]}"
    assert not other.exists() or not any(other.rglob("*")), sorted(other.rglob("*"))
    for n in (0, 1):  # one cache per node, built once there (its two processes share it)
        assert sorted(p.suffix for p in (tmp_path / f"cache{n}").iterdir()) == [".json", ".npy"]


def test_sharded_prediction_spans_two_nodes(tmp_path: Path, make_folder) -> None:
    from chestxray.inference.predict import load_model, predict_paths

    bundle = make_bundle(tmp_path / "bundle")
    images = make_folder({"a": 7, "b": 6}, root="scans")
    port, logs = free_port(), [tmp_path / "node0.log", tmp_path / "node1.log"]
    outs = [tmp_path / f"pred{n}.csv" for n in (0, 1)]
    nodes = [launch(n, port, ["-m", "chestxray.cli", "predict", str(bundle), str(images), "--format", "csv",
                              "--out", str(outs[n]), "--batch-size", "2"], logs[n]) for n in (0, 1)]
    assert wait_all(nodes, 300) == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    written = [out for out in outs if out.exists()]
    assert len(written) == 1, "the table is written once, on the node of global rank 0"
    single = predict_paths(load_model(bundle, backend="torch"), [str(images)], 2, False)
    table = pd.read_csv(written[0])
    assert list(table["file"]) == list(single["file"]) and len(table) == 13


def test_a_node_killed_mid_run_ends_the_other_with_an_error_not_a_hang(subset: Path, tmp_path: Path) -> None:
    port, logs = free_port(), [tmp_path / "node0.log", tmp_path / "node1.log"]
    args = ["-m", "chestxray.cli", "train", str(subset), "--out", str(tmp_path / "out"), "--name", "killed",
            "--cache-dir", str(tmp_path / "cache"), "--image-size=64", "--epochs=30", "--freeze-epochs=1",
            "--batch-size=4", "--seed=0"]
    nodes = [launch(n, port, args, logs[n]) for n in (0, 1)]
    deadline = time.monotonic() + 300
    while "epoch 1/30" not in logs[0].read_text() + logs[1].read_text():  # training has begun on every rank
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), logs[0].read_text()[-2000:]
        time.sleep(0.5)
    kill_node(nodes[1])
    started = time.monotonic()
    code = wait_all(nodes[:1], 180)[0]
    assert code != 0, logs[0].read_text()[-2000:]
    assert "error: another process of this distributed run (4 processes) stopped" in logs[0].read_text()
    assert time.monotonic() - started < 180
