"""The test PACS cannot be used from another host (issue 28): Orthanc 1.10.1 binds 0.0.0.0 with no
bind-address setting, so tests/orthanc.py configures it to refuse every peer but the loopback. Proved
through this machine's own non-loopback address (a connection from it has that address as its source,
as another host's would have its own): HTTP is refused (401) and a DICOM association is rejected, while
the same requests through 127.0.0.1 succeed."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request

import pytest
from orthanc import AE_TITLE, CALLERS, Orthanc, available
from pynetdicom import AE

pytestmark = [pytest.mark.pacs, pytest.mark.skipif(available() is not None, reason=available() or "")]
VERIFICATION = "1.2.840.10008.1.1"


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine outside 127.0.0.0/8 (``ip -4 addr``), or None."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    addresses = [line.split()[3].split("/")[0] for line in out.splitlines() if " inet " in line]
    return next((a for a in addresses if not a.startswith("127.")), None)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield orthanc
    orthanc.stop()


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _echo(host: str, port: int, calling: str, source: str | None = None) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate(host, port, ae_title=AE_TITLE, bind_address=(source or "", 0))
    if not assoc.is_established:
        return False
    try:
        return getattr(assoc.send_c_echo(), "Status", None) == 0
    finally:
        assoc.release()


def test_http_and_dicom_answer_the_loopback_only(pacs):
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to test through")
    assert _http_status(f"{pacs.url}/system") == 200
    assert _http_status(f"http://{address}:{pacs.http_port}/system") in (401, 403)  # as from another host
    assert _http_status(f"http://{address}:{pacs.http_port}/dicom-web/studies") in (401, 403)
    assert _echo("127.0.0.1", pacs.dicom_port, CALLERS[0])
    assert not _echo(address, pacs.dicom_port, CALLERS[0], source=address)  # a known AE title, another address
    assert not _echo("127.0.0.1", pacs.dicom_port, "STRANGER")  # an unknown AE title, even from the loopback
