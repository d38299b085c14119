"""The fuzzing harness (a plain module shared by ``tests/test_fuzz.py`` and ``bench/fuzz.py``).

Seeds are real chest X-ray files of ``../shared/datasets`` (read at run time, never copied into the
repository), real pixels re-encoded here as TIFF, 16-bit PNG and DICOM (the datasets hold no TIFF),
and small synthetic images. :func:`mutated` is a hypothesis strategy that damages a seed's bytes as
a fuzzer would (bit flips, boundary values, inserted, deleted, duplicated and truncated ranges,
biased towards the headers where the parsers live). The checks fail on anything but the project's
own :class:`~chestxray.errors.InputError` from ``decode.load_image`` and on any 5xx answer of
``POST /v1/predict``.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conftest import xray_array
from hypothesis import settings
from hypothesis import strategies as st
from PIL import Image

from chestxray.data.decode import load_image
from chestxray.errors import InputError

DATASETS = Path(os.environ.get("CHESTXRAY_DATA") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
REAL_FILES = (
    "dicom_samples/rsna_c64d5667-a776-4f95-9e21-bfabafb07740.dcm",
    "dicom_samples/siim_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "dicom_samples/siim_fake_MONOCHROME1.dcm",
    "dicom_samples/nih_00000001_000.png",
    "dicom_samples/tbx11k_health_h0001.png",
    "dicom_samples/padchest_16747_3_1.jpg",
    "chest_xray_4class/test/bacterial_pneumonia/person1_bacteria_1.jpeg",
    "chest_xray_4class/test/viral_pneumonia/person288_virus_587.jpeg",
)
"""Real files mutated as they are (the smaller ones: each case decodes a whole file)."""
DERIVED_FROM = "dicom_samples/nih_00027426_000.png"
"""A real X-ray whose pixels are re-encoded in the formats the datasets lack."""
HEADER_BYTES = 2048
INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00", b"\xff\xff", b"\x00\x00\x00\x00",
               b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00", b"\x00\x01\x00\x00",
               b"\xff\xfe", b"\xfe\xff\xff\xff")
"""Boundary values a length, size or count field turns into errors with."""


@dataclass(frozen=True)
class Seed:
    """One valid file the mutations start from."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Case:
    """One mutated input: the seed's name (its suffix routes DICOM) and the damaged bytes."""

    seed: str
    name: str
    data: bytes


def examples(full: int) -> int:
    """A property test's example count: ``full`` under the ``full`` profile (``make test``), the
    profile's own small count under ``fast`` (``make test-fast``; profiles in tests/conftest.py)."""
    return full if settings.get_current_profile_name() == "full" else min(full, settings.default.max_examples)


def _encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, photometric: str, compress: str | None = None, **tags) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = 12 if pixels.dtype == np.uint16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if compress:
        ds.compress(compress)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def made_seeds(real: np.ndarray | None = None) -> list[Seed]:
    """Seeds encoded here: TIFF (raw, LZW, deflate, 16-bit), 16-bit PNG, DICOM (8 and 12 bit,
    MONOCHROME1 with a window, RLE-compressed) of ``real`` pixels (default: a synthetic X-ray), and
    a small synthetic PNG and JPEG."""
    import cv2
    from pydicom.uid import RLELossless

    gray = xray_array(96, 128) if real is None else cv2.resize(real, (160, 128), interpolation=cv2.INTER_AREA)
    deep = (gray.astype(np.uint16) * 16)  # 12-bit range
    small = xray_array(40, 56, seed=3)
    return [
        Seed("derived.tif", _encode(gray, "TIFF")),
        Seed("derived_lzw.tiff", _encode(gray, "TIFF", compression="tiff_lzw")),
        Seed("derived_deflate.tif", _encode(np.stack([gray] * 3, -1), "TIFF", compression="tiff_adobe_deflate")),
        Seed("derived16.tif", _encode(deep, "TIFF")),
        Seed("derived16.png", _encode(deep, "PNG")),
        Seed("derived8.dcm", _dicom(gray, "MONOCHROME2")),
        Seed("derived12.dcm", _dicom(deep, "MONOCHROME1", WindowCenter=2000, WindowWidth=3000,
                                     RescaleSlope=1, RescaleIntercept=0)),
        Seed("derived_rle.dcm", _dicom(deep, "MONOCHROME2", compress=RLELossless)),
        Seed("synthetic.png", _encode(small, "PNG")),
        Seed("synthetic.jpg", _encode(small, "JPEG", quality=90)),
        Seed("synthetic_rgba.png", _encode(np.dstack([small, small, small, small]), "PNG")),
    ]


def _patch_element(data: bytes, tag: tuple[int, int], new_vr: bytes | None = None,
                   new_length: int | None = None) -> bytes:
    """Change the VR or the 2-byte length of one explicit-VR little-endian DICOM element."""
    at = data.index(struct.pack("<HH", *tag), 132)
    patched = bytearray(data)
    if new_vr is not None:
        patched[at + 4:at + 6] = new_vr
    if new_length is not None:
        patched[at + 6:at + 8] = struct.pack("<H", new_length)
    return bytes(patched)


def damaged_files() -> dict[str, bytes]:
    """The damage the adversarial pass of issue 17 answered with 500s, each raising another exception
    type inside PIL or pydicom: regression cases for the decoder and the server."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 4) + ihdr[4:]  # PIL: "Truncated IHDR chunk" (ValueError)
    deep = (np.indices((32, 40)).sum(axis=0) * 50).astype(np.uint16)
    dicom = _dicom(deep, "MONOCHROME2", WindowCenter=2000, WindowWidth=3000)
    tiff = bytearray(_encode(xray_array(32, 32), "TIFF"))
    tiff[4:8] = struct.pack("<I", 0xFFFFFFF0)  # the first IFD far beyond the end of the file
    return {
        "truncated_ihdr.png": png,
        "unknown_vr.dcm": _patch_element(dicom, (0x0028, 0x0010), new_vr=b"ZZ"),  # NotImplementedError
        "meta_unknown_vr.dcm": _patch_element(dicom, (0x0002, 0x0010), new_vr=b"UP"),  # raised by the header read
        "odd_length_us.dcm": _patch_element(dicom, (0x0028, 0x0010), new_length=3),  # BytesLengthException
        "window_overflow.dcm": dicom.replace(b"3000", b"9e99"),  # an infinite window width
        "bad_ifd.tif": bytes(tiff),
    }


def load_seeds(datasets: Path = DATASETS) -> list[Seed]:
    """Every seed: the real files present under ``datasets`` and the seeds made from their pixels
    (synthetic pixels only when the datasets are absent)."""
    seeds = [Seed(Path(rel).name, (datasets / rel).read_bytes()) for rel in REAL_FILES if (datasets / rel).is_file()]
    derived = datasets / DERIVED_FROM
    return seeds + made_seeds(load_image(derived) if derived.is_file() else None)


def _position(draw, size: int) -> int:
    """A byte offset, half of the time inside the header region."""
    if size <= 1:
        return 0
    if draw(st.booleans()):
        return draw(st.integers(0, min(size, HEADER_BYTES) - 1))
    return draw(st.integers(0, size - 1))


@st.composite
def mutated(draw, seeds: list[Seed]) -> Case:
    """A seed damaged by one to eight mutations."""
    seed = draw(st.sampled_from(seeds))
    data = bytearray(seed.data)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(("flip", "interesting", "overwrite", "insert", "delete", "duplicate", "truncate")))
        at = _position(draw, len(data))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "interesting":
            value = draw(st.sampled_from(INTERESTING))
            data[at:at + len(value)] = value
        elif op == "overwrite":
            value = draw(st.binary(min_size=1, max_size=32))
            data[at:at + len(value)] = value
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 512))]
        elif op == "duplicate":
            chunk = bytes(data[at:at + draw(st.integers(1, 1024))])
            target = _position(draw, len(data))
            data[target:target] = chunk
        elif op == "truncate":
            del data[at:]
    name = seed.name if draw(st.integers(0, 9)) else draw(st.sampled_from(("upload", "x.png", "x.dcm", "x.tif")))
    return Case(seed.name, name, bytes(data))


def check_decode(case: Case) -> str:
    """``load_image`` of the case: a 2-D uint8 image or an :class:`InputError`; ``"ok"`` or ``"refused"``.

    Anything else (another exception, another result) propagates: the harness fails."""
    try:
        image = load_image(case.data, name=case.name)
    except InputError as err:
        assert err.reason and "\n" not in str(err), repr(err)
        return "refused"
    assert isinstance(image, np.ndarray) and image.ndim == 2 and image.dtype == np.uint8 and image.size, \
        (image.shape, image.dtype)
    return "ok"


CONTENT_TYPES = ("image/png", "image/jpeg", "image/tiff", "application/dicom", "application/octet-stream", "")


def check_predict(client, case: Case, content_type: str) -> int:
    """``POST /v1/predict`` of the case (``client``: a Starlette TestClient or an httpx client):
    200 with probabilities, or a 4xx JSON ``{"error": ...}``; never a 5xx. Returns the status."""
    upload = (case.name, case.data, content_type) if content_type else (case.name, case.data)
    response = client.post("/v1/predict", files={"file": upload})
    assert response.status_code < 500, (case.seed, response.status_code, response.text[:300])
    body = response.json()
    if response.status_code == 200:
        assert set(body["probabilities"]) and body["label"], body
    else:
        assert response.status_code in (413, 415, 422), (response.status_code, body)
        assert isinstance(body.get("error"), str) and body["error"], body
    return response.status_code
