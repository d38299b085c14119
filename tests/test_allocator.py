"""The allocator switch: the CLI re-executes itself on tcmalloc, `CHESTXRAY_ALLOCATOR=system` turns that
off, a missing library is said once and the run goes on, and torchrun ranks and serve workers inherit it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from factories import make_bundle

from chestxray import allocator

TCMALLOC = allocator.find_library("tcmalloc")
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="libtcmalloc-minimal4 not installed (make installs it)")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any preloaded library or allocator setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV) and
           not k.startswith("CHESTXRAY_ALLOCATOR")}
    return {**env, **extra}


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chestxray.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


@needs_tcmalloc
@pytest.mark.slow  # starts the CLI in a new process (2 s each)
def test_cli_puts_itself_on_tcmalloc() -> None:
    done = cli("info", env=clean_env())
    assert done.returncode == 0, done.stderr
    assert re.search(r"allocator\s+tcmalloc \(", done.stdout), done.stdout
    assert done.stderr == ""
    version = cli("--version", env=clean_env())  # answered without re-executing, but says what commands get
    assert "commands run on allocator tcmalloc" in version.stdout


@pytest.mark.slow  # starts the CLI in a new process (2 s each)
def test_system_turns_it_off() -> None:
    done = cli("info", env=clean_env(CHESTXRAY_ALLOCATOR="system"))
    assert done.returncode == 0, done.stderr
    assert re.search(r"allocator\s+system \(", done.stdout), done.stdout
    assert "warning" not in done.stderr
    assert "commands run on allocator system" in cli("--version", env=clean_env(CHESTXRAY_ALLOCATOR="system")).stdout


@pytest.mark.slow  # starts the CLI in a new process (2 s each)
def test_missing_library_is_said_once_and_the_command_goes_on(tmp_path: Path) -> None:
    missing = tmp_path / "libtcmalloc_minimal.so.4"
    done = cli("info", env=clean_env(CHESTXRAY_ALLOCATOR=str(missing)))
    assert done.returncode == 0
    assert re.search(r"allocator\s+system \(", done.stdout), done.stdout
    assert done.stderr.count("warning") == 1 and str(missing) in done.stderr


def test_default_missing_library_warns_once_per_process_tree(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(allocator, "_SEARCH", ())
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    for key in ("LD_PRELOAD", allocator.ENV, "CHESTXRAY_ALLOCATOR_WARNED", "CHESTXRAY_ALLOCATOR_REEXEC"):
        monkeypatch.delenv(key, raising=False)

    def never(*args: object) -> None:
        raise AssertionError("re-executed without a library")

    assert allocator.find_library() is None
    allocator.ensure_allocator(["chestxray", "train"], execv=never)
    allocator.ensure_allocator(["chestxray", "train"], execv=never)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "libtcmalloc-minimal4" in err
    assert os.environ["CHESTXRAY_ALLOCATOR_WARNED"] == "1"  # inherited by torchrun ranks and workers


def test_reexecution_keeps_the_command_line_and_other_preloads(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    library = tmp_path / "libmyalloc.so.1"
    library.write_bytes(b"")
    monkeypatch.setenv(allocator.ENV, str(library))
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    monkeypatch.delenv("CHESTXRAY_ALLOCATOR_REEXEC", raising=False)
    calls = []
    allocator.ensure_allocator(["python", "-m", "chestxray.cli", "train", "data", "--epochs", "2"],
                               execv=lambda exe, argv, env: calls.append((exe, argv, env)))
    (exe, argv, env), = calls
    assert exe == sys.executable and argv == [sys.executable, "-m", "chestxray.cli", "train", "data", "--epochs", "2"]
    assert env["LD_PRELOAD"] == f"{library}:/opt/other.so"
    # the re-executed process does not loop, and its children start afresh
    monkeypatch.setenv("CHESTXRAY_ALLOCATOR_REEXEC", "1")
    allocator.ensure_allocator(["chestxray"], execv=lambda *a: pytest.fail("looped"))
    assert "CHESTXRAY_ALLOCATOR_REEXEC" not in os.environ


@needs_tcmalloc
@pytest.mark.slow
def test_torchrun_ranks_run_on_tcmalloc() -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "chestxray.cli", "info"]
    done = subprocess.run(command, env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(re.findall(r"allocator\s+tcmalloc \(", done.stdout)) == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_tcmalloc
@pytest.mark.slow
def test_serve_workers_run_on_tcmalloc(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "chestxray.cli", "serve", str(bundle), "--port", str(port)],
                              env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                    assert response.status == 200
                break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.5)
        maps = Path(f"/proc/{server.pid}/maps").read_text()
        assert "libtcmalloc" in maps  # the same process id: re-executed in place
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize("library", [Path("/usr/lib/libtcmalloc_minimal.so.4"), None], ids=["installed", "missing"])
def test_the_python_api_says_once_when_it_trains_on_the_system_allocator(monkeypatch, capsys, library) -> None:
    """A notebook's fit() runs on whatever the interpreter was started with; the training line says which
    allocator, and on the system one a note says how to get tcmalloc (the CLI re-executes instead)."""
    from types import SimpleNamespace

    from chestxray import train
    from chestxray.config import TrainConfig

    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.delenv("CHESTXRAY_ALLOCATOR_WARNED", raising=False)
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    monkeypatch.setattr(train, "active_allocator", lambda: "system")
    monkeypatch.setattr(allocator, "find_library", lambda choice=None: library)
    prepared = SimpleNamespace(train_rows=[0, 1], val_rows=[2], samples=SimpleNamespace(classes=["a", "b"]))
    train._start_run(None, TrainConfig(), prepared)
    err = capsys.readouterr().err
    assert "allocator system" in err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "system allocator" in notes[0]
    assert (f"LD_PRELOAD={library}" in notes[0] and "jupyter" in notes[0]) if library else \
        "libtcmalloc-minimal4" in notes[0]


def test_no_note_where_the_allocator_was_chosen_or_already_said(monkeypatch) -> None:
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    monkeypatch.setenv(allocator.ENV, "system")  # chosen: nothing to say
    assert allocator.system_allocator_note() is None
    monkeypatch.delenv(allocator.ENV)
    monkeypatch.setenv("CHESTXRAY_ALLOCATOR_WARNED", "1")  # the command line warned already
    assert allocator.system_allocator_note() is None
    monkeypatch.delenv("CHESTXRAY_ALLOCATOR_WARNED")
    assert allocator.system_allocator_note() is not None
    monkeypatch.setattr(allocator, "active_allocator", lambda: "tcmalloc")
    assert allocator.system_allocator_note() is None
