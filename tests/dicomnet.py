"""What a modality and a PACS reader do, for the DICOM network tests: small X-ray instances
(:func:`xray_dataset`), sent by C-STORE (:func:`send`), and the reports found in Orthanc (:func:`srs_in`);
and the fixtures those tests share (a ``CLASSES`` bundle and its predictor, one per test module)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pydicom
import pytest
from conftest import xray_array
from factories import make_bundle
from orthanc import Orthanc
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from chestxray.dicom.dicomresult import CR_STORAGE, read_sr
from chestxray.inference.predict import load_model

CLASSES = ["normal", "pneumonia", "covid19"]
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "b", CLASSES)


@pytest.fixture(scope="module")
def predictor(bundle):
    return load_model(bundle)


def xray_dataset(sop_class: str = CR_STORAGE, modality: str = "CR", seed: int = 0, **tags) -> Dataset:
    """A small valid X-ray instance of ``sop_class`` in a new study."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.AccessionNumber = "P1", "Test^Patient", "ACC1"
    ds.Modality, ds.InstanceNumber = modality, 1
    pixels = xray_array(64, 64, seed)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def send(port: int, datasets: list[Dataset], calling: str = "MODALITY") -> list[int | None]:
    """C-STORE each dataset to the node as a modality would; the DIMSE status of each (None: no association)."""
    ae = AE(ae_title=calling)
    for sop_class, syntax in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="CHESTXRAY")
    if not assoc.is_established:
        return [None] * len(datasets)
    try:
        return [getattr(assoc.send_c_store(d), "Status", None) for d in datasets]
    finally:
        assoc.release()


def srs_in(pacs: Orthanc) -> dict[str, dict]:
    """SR content in the PACS by the SOP Instance UID of the image it reports on."""
    reports = {}
    for instance in pacs.find(Modality="SR"):
        content = read_sr(pydicom.dcmread(io.BytesIO(pacs.file(instance))))
        reports[content["source_sop_instance_uid"]] = content
    return reports


def wait_for(condition, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False
