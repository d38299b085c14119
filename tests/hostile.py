"""Hostile peers shared by the hostile tests and the bench scripts (a plain module, not a test module):
a loopback HTTP server whose answers a test writes to the socket itself (:func:`http_server`), the
answers a broken or hostile DICOMweb server gives (junk multipart, HTML, an endless stream, a drip,
silence), hostile worklist rows (``/dev/zero``, a FIFO, a sparse huge file, junk), and the raw-socket
helpers of the flood tests (:func:`connect` from another loopback address, :func:`closed_by_server`).

Loopback only: every ``127.x.y.z`` is loopback on Linux, so one machine plays many client addresses.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

BOUNDARY = "b0undary"
DICOM_MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
Answer = Callable[[socket.socket], None]


@contextmanager
def http_server(answer: Answer) -> Iterator[str]:
    """A loopback HTTP server that reads one request head per connection and lets ``answer`` write
    to the socket; yields its DICOMweb root URL. ``answer`` may loop: it ends when the client goes away."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
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
    """A multipart/related body of ``(content type, bytes)`` parts with :data:`BOUNDARY`."""
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n" for kind, data in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


def answers(body: bytes, content_type: str = DICOM_MULTIPART) -> Answer:
    """An answer: 200 with ``body`` and ``content_type``, then close."""
    def answer(conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
    return answer


def streams_forever(sent: list[int] | None = None) -> Answer:
    """An answer that streams chunked bytes until the client goes away (the lengths sent go to ``sent``)."""
    def answer(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: multipart/related; boundary=x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        while True:
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if sent is not None:
                sent.append(len(chunk))
    return answer


def silent(seconds: float = 120) -> Answer:
    """A server that accepts the request and never answers."""
    return lambda conn: time.sleep(seconds)


def drips(body_too: bool, interval: float = 0.05) -> Answer:
    """An answer dripped a byte every ``interval`` seconds: its head, or (``body_too``) a whole head then
    a long body."""
    def answer(conn: socket.socket) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: multipart/related; boundary=x\r\nContent-Length: 100000\r\n\r\n"
        if body_too:
            conn.sendall(head)
            head = b"y" * 100000
        for byte in head:
            conn.sendall(bytes([byte]))
            time.sleep(interval)
    return answer


def part10(ds) -> bytes:
    """A pydicom dataset as Part-10 bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def hostile_files(folder: Path, sparse_bytes: int = 3 << 30) -> dict[str, str]:
    """Paths a hostile worklist names, by kind: a device that never ends, a FIFO nobody writes to, a
    sparse file over the size limit (no disk used), a folder, junk and empty files, a missing path."""
    folder.mkdir(parents=True, exist_ok=True)
    fifo, sparse = folder / "fifo.png", folder / "sparse.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    with open(sparse, "wb") as handle:
        handle.truncate(sparse_bytes)
    (folder / "junk.png").write_bytes(os.urandom(4096))
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "a_folder.png").mkdir(exist_ok=True)
    return {"dev_zero": "/dev/zero", "fifo": str(fifo), "sparse": str(sparse), "folder": str(folder / "a_folder.png"),
            "junk": str(folder / "junk.png"), "empty": str(folder / "empty.dcm"), "missing": str(folder / "nope.png")}


def connect(port: int, source: str = "127.0.0.1", host: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to ``host:port`` from the loopback address ``source``."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    """True when the peer closed ``sock`` (EOF or a reset) within ``wait`` seconds (what it sent is dropped)."""
    sock.settimeout(wait)
    try:
        while sock.recv(4096):
            pass
        return True
    except (TimeoutError, socket.timeout):
        return False
    except ConnectionResetError:
        return True


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


SLOW_HEAD = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
             b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
             b"filename=\"x.png\"\r\n\r\n\x89PNG")
"""A request head and the start of an upload whose body is then sent a byte at a time."""


class SlowBodies(threading.Thread):
    """A slow-body flood: ``per_source`` connections from each loopback address of ``sources``, each
    sending :data:`SLOW_HEAD` and then one body byte every ``interval`` seconds, until the server answers
    or closes; with ``reconnect``, each answered connection is replaced by a new one from its address,
    so the flood lasts until :meth:`stop_flood`. ``events`` holds ``(status, seconds from its opening)``
    per answered connection (status ``0``: closed without an answer)."""

    def __init__(self, port: int, sources: list[str], per_source: int, interval: float = 1.0,
                 reconnect: bool = False) -> None:
        super().__init__(daemon=True)
        self.port, self.interval, self.reconnect = port, interval, reconnect
        self.start_time = time.monotonic()
        self.events: list[tuple[int, float]] = []
        self.open: dict[socket.socket, tuple[str, float, bytes]] = {}
        self._halt = threading.Event()
        for source in sources:
            for _ in range(per_source):
                self._open(source)

    def _open(self, source: str) -> None:
        try:
            sock = connect(self.port, source)
            sock.sendall(SLOW_HEAD)
        except OSError:
            self.events.append((0, 0.0))
            return
        self.open[sock] = (source, time.monotonic(), b"")

    def _answered(self, sock: socket.socket, data: bytes) -> None:
        source, opened, _ = self.open.pop(sock)
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") and data.count(b" ") >= 2 else 0
        self.events.append((status, round(time.monotonic() - opened, 2)))
        sock.close()
        if self.reconnect and not self._halt.is_set():
            self._open(source)

    def run(self) -> None:
        import select

        next_drip = time.monotonic() + self.interval
        while not self._halt.is_set() and self.open:
            readable, _, _ = select.select(list(self.open), [], [], max(0.0, min(0.5, next_drip - time.monotonic())))
            for sock in readable:
                try:
                    chunk = sock.recv(4096)
                except OSError:
                    chunk = b""
                source, opened, data = self.open[sock]
                data += chunk
                self.open[sock] = (source, opened, data)
                if b"\r\n" in data or not chunk:
                    self._answered(sock, data)
            if time.monotonic() >= next_drip:
                next_drip += self.interval
                for sock in list(self.open):
                    try:
                        sock.sendall(b"x")
                    except OSError:
                        self._answered(sock, self.open[sock][2])

    def held(self) -> int:
        """Connections waiting for an answer now."""
        return len(self.open)

    def stop_flood(self) -> None:
        self._halt.set()
        self.join(5)
        for sock in list(self.open):
            sock.close()

    def summary(self) -> dict:
        """Answer statuses counted, and the shortest and longest time from opening to answer."""
        statuses: dict[str, int] = {}
        for status, _ in self.events:
            statuses[str(status or "closed")] = statuses.get(str(status or "closed"), 0) + 1
        cut = sorted(t for status, t in self.events if status == 408)
        return {"answered": statuses, "unanswered": self.held(),
                "408_after_s_min": cut[0] if cut else None, "408_after_s_max": cut[-1] if cut else None}
