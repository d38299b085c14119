"""A real PACS for the tests and benchmarks: Debian's Orthanc with its DICOMweb plugin, started on
free ports with a configuration written here, stopped afterwards (``make pacs`` installs it).

Orthanc 1.10.1 binds every address (0.0.0.0) and has no setting to bind one, so the configuration
makes it useless from another host: ``RemoteAccessAllowed: false`` (HTTP from an address other than
the loopback's is answered 401), and on the DICOM port no "always allow" of C-ECHO, C-STORE, C-FIND,
C-GET or C-MOVE, the called AE title checked, and the only peers the AE titles of :data:`CALLERS`
registered at 127.0.0.1 with ``DicomCheckModalityHost`` (an association from any other address, or
any other AE title, is rejected). tests/test_orthanc_fixture.py proves it through the machine's own
non-loopback address.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AE_TITLE = "ORTHANC"
CALLERS = ("CHESTXRAY",)
"""Calling AE titles allowed to associate (from 127.0.0.1 only): ``chestxray listen`` delivering its reports."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def available() -> str | None:
    """Why Orthanc cannot run here (``None`` when it can)."""
    if not Path(ORTHANC).is_file():
        return "Orthanc is not installed (run `make pacs`)"
    if not DICOMWEB_PLUGIN.is_file():
        return "the Orthanc DICOMweb plugin is not installed (run `make pacs`)"
    return None


class Orthanc:
    """One Orthanc process with its database in ``folder``; its ports are chosen when it is made."""

    def __init__(self, folder: Path, callers: tuple[str, ...] = CALLERS) -> None:
        self.folder = Path(folder)
        self.callers = callers
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "chestxray-test", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": AE_TITLE, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpServerEnabled": True, "DicomServerEnabled": True, "DicomCheckCalledAet": True,
            # no DICOM peer but the registered callers, from the loopback only (see the module docstring)
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False, "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowFindWorklist": False, "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False,
            "DicomCheckModalityHost": True, "DicomModalitiesInDatabase": False,
            "DicomModalities": {title.lower(): [title, "127.0.0.1", 104] for title in self.callers},
            "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "ConcurrentJobs": 1, "StableAge": 1, "OrthancExplorerEnabled": False, "WebDavEnabled": False,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = open(self.folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([ORTHANC, str(path)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                self.get("/system")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "log", None):
            self.log.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type} if body is not None else {})
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.read()

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def upload(self, data: bytes) -> dict[str, Any]:
        """Store one DICOM file through the REST API."""
        return json.loads(self.request("POST", "/instances", data, "application/dicom"))

    def find(self, **query: str) -> list[str]:
        """Orthanc ids of the instances matching a DICOM query (e.g. ``Modality="SR"``)."""
        body = json.dumps({"Level": "Instance", "Query": query}).encode()
        return json.loads(self.request("POST", "/tools/find", body))

    def file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")
