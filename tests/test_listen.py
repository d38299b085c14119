"""``chestxray listen`` against a real PACS (Orthanc): X-rays in by C-STORE, structured reports out."""

from __future__ import annotations

import errno
import json
import time

import pydicom
import pytest
from dicomnet import CLASSES, CT_STORAGE, MR_STORAGE, bundle, predictor, send, srs_in, wait_for, xray_dataset  # noqa: F401 (fixtures)
from orthanc import AE_TITLE, Orthanc, available, free_port
from pynetdicom import AE
from typer.testing import CliRunner

from chestxray.dicom.inferencelog import AuditTrail
from chestxray.cli import app
from chestxray.dicom.listen import (CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SOP_CLASS_NOT_SUPPORTED, SUCCESS,
                              Destination, ListenConfig, Listener)

pytestmark = pytest.mark.skipif(available() is not None, reason=available() or "")


@pytest.fixture
def pacs(tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    yield orthanc
    orthanc.stop()


@pytest.fixture
def node(predictor, tmp_path, pacs, audit_log):
    """``node(**config) -> Listener`` started on a free port, sending to ``pacs``; all stopped after."""
    started = []

    def start(**settings) -> Listener:
        settings.setdefault("destination", Destination(AE_TITLE, "127.0.0.1", pacs.dicom_port))
        config = ListenConfig(spool=settings.pop("spool", tmp_path / "spool"), port=free_port(),
                              retry_base_s=0.2, retry_max_s=1.0, **settings)
        listener = Listener(predictor, config, AuditTrail(audit_log))
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.stop()


def test_each_sample_gets_an_sr_in_the_pacs_that_matches_predict(node, pacs, bundle, dicom_samples, audit_log,
                                                                tmp_path):
    files = sorted(dicom_samples.glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    listener = node()
    assert send(listener.config.port, datasets) == [SUCCESS] * len(files)
    uids = {str(d.SOPInstanceUID) for d in datasets}
    assert wait_for(lambda: len(srs_in(pacs)) == len(uids))
    out = tmp_path / "predict.json"
    result = CliRunner().invoke(app, ["predict", str(bundle), *map(str, files), "--format", "json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    expected: dict[str, list[dict]] = {}
    for ds, row in zip(datasets, json.loads(out.read_text())):
        expected.setdefault(str(ds.SOPInstanceUID), []).append(row)
    reports = srs_in(pacs)
    for uid, rows in expected.items():  # two samples share one SOP Instance UID: the SR is of one of them
        report = reports[uid]
        assert any(report["finding"] == [row["label"]] and
                   all(abs(report["probabilities"][c] - row["probabilities"][c]) < 1e-4 for c in CLASSES)  # 4 decimals
                   for row in rows), report
        assert report["model_id"] == rows[0]["model_id"] and report["weights_sha256"].startswith(
            rows[0]["model_id"].split("@")[1])
        assert report["refer"] == bool(report["reasons"]) and "Not a diagnostic device" in report["notice"]
    sr_study = {pacs.get(f"/instances/{i}/tags?simplify")["StudyInstanceUID"] for i in pacs.find(Modality="SR")}
    assert sr_study == {str(d.StudyInstanceUID) for d in datasets}  # each SR lies in its source's study
    lines = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert [line["source"] for line in lines].count("predict") == len(files)  # the predict run above
    lines = [line for line in lines if line["source"] == "listen"]
    # one line per inference: a re-sent UID waiting in the spool replaces the earlier copy (same instance)
    assert len(uids) <= len(lines) <= len(files) and {line["sop_instance_uid"] for line in lines} == uids
    assert all(line["source"] == "listen" and line["caller"].startswith("MODALITY@") and line["model_id"]
               and len(line["input_sha256"]) == 64 and "patient" not in line for line in lines)


def test_echo_refusals_and_a_corrupt_dataset_leave_the_node_working(node, pacs):
    listener = node()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", listener.config.port, ae_title="CHESTXRAY")
    assert assoc.send_c_echo().Status == SUCCESS
    assoc.release()
    corrupt = xray_dataset()
    corrupt.PixelData = corrupt.PixelData[:100]  # cut short
    ct, mr = xray_dataset(CT_STORAGE, "CT"), xray_dataset(MR_STORAGE, "MR")
    skull = xray_dataset(BodyPartExamined="SKULL")
    good = xray_dataset(seed=3)
    statuses = send(listener.config.port, [ct, mr, corrupt, skull, good])
    assert statuses == [SOP_CLASS_NOT_SUPPORTED, SOP_CLASS_NOT_SUPPORTED, CANNOT_UNDERSTAND, SUCCESS, SUCCESS]
    assert wait_for(lambda: len(srs_in(pacs)) == 2)
    reports = srs_in(pacs)
    assert reports[good.SOPInstanceUID]["finding"] and set(reports[good.SOPInstanceUID]["probabilities"]) == set(CLASSES)
    assert reports[skull.SOPInstanceUID] ["finding"] == [] and reports[skull.SOPInstanceUID]["refer"]
    assert reports[skull.SOPInstanceUID]["reasons"] == ["not_frontal_cxr: BodyPartExamined SKULL"]
    assert not list(listener.spool.failed.iterdir())


def test_an_allow_list_rejects_unknown_calling_ae_titles(node):
    listener = node(allowed_callers=["XRAY1"])
    assert send(listener.config.port, [xray_dataset()], calling="INTRUDER") == [None]
    assert send(listener.config.port, [xray_dataset()], calling="XRAY1") == [SUCCESS]


def test_a_down_destination_is_retried_and_a_restart_resumes_the_queue(predictor, tmp_path, node):
    down = Orthanc(tmp_path / "later")  # its ports are chosen, nothing listens on them yet
    spool = tmp_path / "spool-q"
    first = node(destination=Destination(AE_TITLE, "127.0.0.1", down.dicom_port), spool=spool)
    images = [xray_dataset(seed=i) for i in range(3)]
    assert send(first.config.port, images) == [SUCCESS] * 3
    assert wait_for(lambda: len(first.spool.pending(first.spool.outbox)) == 3)
    first.stop()  # the node goes down with three reports undelivered
    second = node(destination=Destination(AE_TITLE, "127.0.0.1", down.dicom_port), spool=spool)
    time.sleep(1.0)  # a few failed tries with back-off
    down.start()
    try:
        assert wait_for(lambda: len(srs_in(down)) == 3)
        assert set(srs_in(down)) == {d.SOPInstanceUID for d in images}
        assert second.wait_idle(10)
    finally:
        down.stop()


def test_a_full_spool_refuses_with_out_of_resources_and_keeps_what_it_has(node, pacs, monkeypatch):
    listener = node()
    kept = xray_dataset(seed=1)
    assert send(listener.config.port, [kept]) == [SUCCESS]
    listener.spool.min_free_bytes = 1 << 62  # the disk is now under the reserve
    refused = xray_dataset(seed=2)
    assert send(listener.config.port, [refused]) == [OUT_OF_RESOURCES]
    listener.spool.min_free_bytes = 0

    from chestxray.dicom import listen as module

    real_write = module._write_durably

    def disk_full_for_incoming(path, data):  # the disk fills up as the next instance is written
        if path.parent == listener.spool.incoming:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(module, "_write_durably", disk_full_for_incoming)
    assert send(listener.config.port, [xray_dataset(seed=3)]) == [OUT_OF_RESOURCES]
    assert wait_for(lambda: set(srs_in(pacs)) == {kept.SOPInstanceUID})
    assert not list(listener.spool.root.rglob("*.part"))


def test_gradcam_goes_to_the_pacs_as_secondary_capture_in_a_new_series(node, pacs):
    listener = node(cam=True)
    image = xray_dataset(seed=5)
    assert send(listener.config.port, [image]) == [SUCCESS]
    assert wait_for(lambda: len(pacs.find(Modality="OT")) + len(pacs.find(SOPClassUID="1.2.840.10008.5.1.4.1.1.7")) >= 1
                    and len(srs_in(pacs)) == 1)
    cam_id = pacs.find(SOPClassUID="1.2.840.10008.5.1.4.1.1.7")[0]
    tags = pacs.get(f"/instances/{cam_id}/tags?simplify")
    assert tags["StudyInstanceUID"] == image.StudyInstanceUID and tags["SeriesInstanceUID"] != image.SeriesInstanceUID
    assert tags["PhotometricInterpretation"] == "RGB"
