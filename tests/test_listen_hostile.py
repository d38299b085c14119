"""``chestxray listen`` under hostile peers and a struggling destination (issue 28), without a PACS:
an oversized C-STORE is refused without being held in memory, idle sockets and associations are
closed by the timeouts, one address cannot take every connection, a destination answering 0xA700
gets the back-off of one that is down, and ``failed/`` is given another chance."""

from __future__ import annotations

import io
import logging
import socket
import time

import numpy as np
import pytest
from dicomnet import bundle, predictor, send, wait_for, xray_dataset  # noqa: F401 (fixtures)
from hostile import closed_by_server
from orthanc import free_port
from pynetdicom import AE, evt

from chestxray.errors import ChestXrayError
from chestxray.listen import OUT_OF_RESOURCES, SUCCESS, Destination, ListenConfig, Listener


@pytest.fixture
def node(predictor, tmp_path):
    started = []

    def start(**settings) -> Listener:
        config = ListenConfig(spool=settings.pop("spool", tmp_path / "spool"), port=free_port(),
                              retry_base_s=0.2, retry_max_s=5.0, **settings)
        listener = Listener(predictor, config)
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


def big_dataset(side: int):
    ds = xray_dataset()
    ds.Rows = ds.Columns = side
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (side, side), dtype=np.uint8).tobytes()
    return ds


def test_a_dataset_over_the_limit_is_refused_and_never_spooled(node):
    """Before: any size was accepted, held whole in memory (a 200 MB C-STORE raised RSS to 1.93 GB)."""
    listener = node(max_dataset_bytes=200_000)
    big, small = big_dataset(600), xray_dataset(seed=3)  # 360 kB of pixels against a 200 kB limit
    assert send(listener.config.port, [big, small]) == [OUT_OF_RESOURCES, SUCCESS]
    spool = listener.spool
    names = {p.name for folder in (spool.incoming, spool.working) for p in folder.glob("*.dcm")}
    assert f"{big.SOPInstanceUID}.dcm" not in names
    assert not list(spool.receiving.iterdir())  # nothing left of either receipt
    assert wait_for(lambda: not spool.pending(spool.incoming) and not spool.pending(spool.working), 60)


def test_idle_sockets_and_associations_are_closed_and_one_address_cannot_take_every_slot(node):
    """Before: 12 idle TCP sockets or 10 idle associations locked every sender out for 30 to 60 s."""
    listener = node(max_per_address=3, acse_timeout_s=0.5, network_timeout_s=0.5)
    port = listener.config.port
    hogs = []
    for _ in range(4):
        sock = socket.socket()
        sock.bind(("127.0.0.2", 0))  # every 127.x.y.z is loopback on Linux: another address
        sock.connect(("127.0.0.1", port))
        hogs.append(sock)
    time.sleep(0.2)
    assert closed_by_server(hogs[3], 5)  # the fourth from that address is closed at once
    assert send(port, [xray_dataset(seed=4)]) == [SUCCESS]  # another address is served meanwhile
    assert all(closed_by_server(sock, 10) for sock in hogs[:3])  # no association request: closed by ACSE
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(xray_dataset().SOPClassUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CHESTXRAY")
    assert assoc.is_established
    assert wait_for(lambda: not assoc.is_established, 10)  # an idle association: closed by the network timeout
    for sock in hogs:
        sock.close()


class Destination_:
    """A C-STORE SCP answering each request with ``statuses`` in turn (the last one repeats)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.calls: list[float] = []
        self.ae = AE(ae_title="PACS")
        from pynetdicom import AllStoragePresentationContexts

        self.ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:
        self.calls.append(time.monotonic())
        return self.statuses[min(len(self.calls), len(self.statuses)) - 1]


def test_a_destination_out_of_resources_gets_the_back_off_and_nothing_moves_to_failed(node, caplog):
    """Before: 0xA700 was retried about every 1.1 s, counted as a refusal, and after max_attempts the
    SR went to failed/, never resent."""
    pacs = Destination_([0xA700] * 4 + [SUCCESS])
    try:
        caplog.set_level(logging.WARNING, "chestxray.listen")
        listener = node(destination=Destination("PACS", "127.0.0.1", pacs.port), max_attempts=2)
        assert send(listener.config.port, [xray_dataset(seed=5)]) == [SUCCESS]
        assert wait_for(lambda: listener.delivered == 1, 60), pacs.calls
        assert len(pacs.calls) == 5 and not list(listener.spool.failed.iterdir())
        delays = [float(r.getMessage().rsplit("next try in ", 1)[1].split(" s")[0])
                  for r in caplog.records if "out of resources" in r.getMessage()]
        assert delays == sorted(delays) and delays[0] < delays[-1]  # exponential back-off
    finally:
        pacs.server.shutdown()


def test_results_in_failed_go_back_to_the_outbox_at_start(predictor, tmp_path):
    spool = tmp_path / "spool"
    (spool / "failed").mkdir(parents=True)
    (spool / "failed" / "1.2.3.dcm").write_bytes(b"sr")
    (spool / "failed" / "1.2.3.json").write_text('{"attempts": 20, "last_status": "0xC000"}')
    (spool / "failed" / "9.9.dcm").write_bytes(b"an instance that could not be assessed")  # no state: stays
    listener = Listener(predictor, ListenConfig(spool=spool, port=free_port()))
    listener.start()
    try:
        assert (spool / "outbox" / "1.2.3.dcm").read_bytes() == b"sr"
        assert sorted(p.name for p in (spool / "failed").iterdir()) == ["9.9.dcm"]
    finally:
        listener.stop()


@pytest.mark.parametrize("settings, message", [
    ({"port": 141211}, "--port 141211: a port is 1 to 65535"),
    ({"max_associations": 0}, "max_associations must be at least 1"),
    ({"network_timeout_s": 0}, "network_timeout_s must be positive"),
])
def test_settings_out_of_range_are_one_line(tmp_path, settings, message):
    with pytest.raises(ChestXrayError, match=message):
        ListenConfig(spool=tmp_path, **settings)


def test_a_spool_that_cannot_be_made_is_one_line(predictor):
    with pytest.raises(ChestXrayError, match="--spool /proc/nope: cannot use it as a spool"):
        Listener(predictor, ListenConfig(spool="/proc/nope"))


def test_pydicom_decoder_tracebacks_stay_out_of_the_logs(predictor, caplog):
    """Before: a garbage JPEG logged pydicom's decoder tracebacks (ERROR with exc_info) in listen's log."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    from chestxray.dicomresult import assess, read_dataset

    ds = xray_dataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0garbage" * 50])
    ds["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    caplog.set_level(logging.INFO)
    [assessment] = assess(predictor, [(read_dataset(buffer.getvalue(), "x"), buffer.getvalue())])
    assert assessment.refer and any(r.startswith("unreadable: ") for r in assessment.reasons)
    assert not [r for r in caplog.records if r.exc_info]
