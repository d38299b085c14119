"""Shared fixtures: tiny synthetic X-rays in any format, a DICOM writer, class folders, an
isolated cache folder, and the real datasets in ``../shared/datasets`` (skipped when absent)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

# The CLI's entry point re-executes its process onto tcmalloc (chestxray.allocator); tests call it
# in-process, so the suite runs on the system allocator. test_allocator.py switches it on explicitly.
os.environ["CHESTXRAY_ALLOCATOR"] = "system"
# Set before torch is imported (by any test or subprocess): OpenMP threads that wait sleep instead of
# spinning. On 2 cores shared with other work, spinning threads starve each other; measured on such a
# machine (load 3-4), test_bundle, test_calibration, test_evaluation and test_predict took 54.8 s
# (52 s of CPU) spinning and 15.9 s (14 s of CPU) passive (not measured on a quiet machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DATASETS = Path(os.environ.get("CHESTXRAY_DATA") or Path(__file__).resolve().parents[2] / "shared" / "datasets")

# The fast tier (`make test-fast`: `pytest -m "not slow"`) must stay fast. An unmarked test whose call
# takes longer than this fails, with a message saying to speed it up or mark it `slow`; a slow machine
# raises it (CHESTXRAY_FAST_TEST_LIMIT_S=20), 0 turns the rule off. On a machine busier than its cores
# the limit grows with the load (see load_factor).
FAST_TEST_LIMIT_S = float(os.environ.get("CHESTXRAY_FAST_TEST_LIMIT_S", "5"))


def load_factor() -> float:
    """How many times over its cores the machine is loaded (1-minute load average), at least 1: on 2
    cores shared with other work, torch's threads wait for each other and a 0.3 s test can take 7 s."""
    try:
        return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:  # no load average on this system
        return 1.0

# Modules that need a real PACS (Orthanc) or talk DICOM over the network: the slow tier, whatever else
# they are marked (their own modules keep no tier marks of their own).
PACS_MODULES = {"test_listen.py", "test_pacs_io.py"}

# Hypothesis: `full` (make test) runs each property test's own example count; `fast` (make test-fast,
# `--hypothesis-profile fast`) caps every count at a few examples (tests/fuzzing.py `examples`).
settings.register_profile("full", deadline=None, database=None)
settings.register_profile("fast", deadline=None, database=None, max_examples=10)
settings.load_profile("full")


def pytest_configure(config: pytest.Config) -> None:
    """Print the slowest tests of every run (``--durations``), so that a test growing slow shows."""
    if config.option.durations is None:
        config.option.durations = 15


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tier marks: a PACS module's tests are ``pacs``; ``pacs`` and ``browser`` tests are ``slow``."""
    for item in items:
        if item.path.name in PACS_MODULES:
            item.add_marker(pytest.mark.pacs)
        if item.get_closest_marker("pacs") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Fail an unmarked test that ran longer than ``FAST_TEST_LIMIT_S``: the fast tier does not decay."""
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or not report.passed or FAST_TEST_LIMIT_S <= 0 or item.get_closest_marker("slow"):
        return
    factor = load_factor()
    if call.duration > FAST_TEST_LIMIT_S * factor:
        busy = f" (x{factor:.1f} for the machine's load)" if factor > 1 else ""
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} took {call.duration:.1f} s, over the fast tier's {FAST_TEST_LIMIT_S:g} s"
                           f"{busy} (tests/conftest.py): make it faster or mark it @pytest.mark.slow; on a slow "
                           "machine set CHESTXRAY_FAST_TEST_LIMIT_S higher (0: no limit)")


def xray_array(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth, asymmetric uint8 picture (two gradients and an off-centre blob), so that a wrong
    orientation, channel or resize shows."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    cy, cx = rng.uniform(0.2, 0.4) * height, rng.uniform(0.2, 0.4) * width
    radius = 0.15 * min(height, width)
    image = 30 + 110 * xx / max(width - 1, 1) + 50 * yy / max(height - 1, 1)
    image += 60 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache folder for every test (``$CHESTXRAY_CACHE``): tests never touch ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("CHESTXRAY_CACHE", str(path))
    return path


@pytest.fixture(autouse=True)
def audit_log(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh audit trail for every test (``$CHESTXRAY_AUDIT_LOG``): tests never write to ~/.local/state."""
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    monkeypatch.setenv("CHESTXRAY_AUDIT_LOG", str(path))
    return path


@pytest.fixture
def xray() -> Callable[..., np.ndarray]:
    """``xray(height=48, width=64, seed=0)``: see :func:`xray_array`."""
    return xray_array


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """``make_image(name, array=None, mode=None, **save_options) -> path`` under ``tmp_path``.

    The format follows the suffix of ``name``; ``mode`` converts first (``"RGB"``, ``"RGBA"``...);
    a uint16 array gives a 16-bit image.
    """
    def make(name: str, array: np.ndarray | None = None, mode: str | None = None, **save_options) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(xray_array() if array is None else array)
        (image.convert(mode) if mode else image).save(path, **save_options)
        return path

    return make


@pytest.fixture
def make_dicom(tmp_path: Path) -> Callable[..., Path]:
    """``make_dicom(name, pixels, photometric="MONOCHROME2", pixel_data=True, compress=None, **tags)``.

    Writes a valid DICOM file with pydicom: 2-D pixels (uint8/uint16/int16) or (H, W, 3) colour;
    ``tags`` (keyword=value) are set last, ``compress`` is a transfer syntax UID to encode with.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    def make(name: str, pixels: np.ndarray, photometric: str = "MONOCHROME2", *, pixel_data: bool = True,
             compress: str | None = None, **tags) -> Path:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Modality = "CR"
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.PhotometricInterpretation = photometric
        ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
        if pixels.ndim == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        if pixel_data:
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
            if compress:
                ds.compress(compress)
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return path

    return make


@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """``make_folder(layout, root="data", suffix=".png", name=None) -> root``: class folders of tiny images.

    ``layout`` is ``{class: count}`` or ``{split: {class: count}}``; ``name(class, i)`` gives a
    file's stem (default ``"<class>_<i>"``). Images differ from each other (seeded by position).
    """
    def make(layout: dict, root: str = "data", suffix: str = ".png",
             name: Callable[[str, int], str] | None = None) -> Path:
        base = tmp_path / root
        nested = all(isinstance(v, dict) for v in layout.values())
        seed = 0
        for split, classes in (layout.items() if nested else [("", layout)]):
            for class_name, count in classes.items():
                folder = base / split / class_name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    stem = name(class_name, i) if name else f"{class_name}_{i}"
                    Image.fromarray(xray_array(24, 32, seed=seed)).save(folder / f"{stem}{suffix}")
                    seed += 1
        return base

    return make


def _dataset(relative: str) -> Path:
    path = DATASETS / relative
    if not path.exists():
        pytest.skip(f"real dataset {path} not present (set CHESTXRAY_DATA to the datasets folder)")
    return path


@pytest.fixture
def course_data() -> Path:
    """The 4-class course dataset folder (``train/``, ``test/``, ``classes.tsv``)."""
    return _dataset("chest_xray_4class")


@pytest.fixture
def pneumoniamnist() -> Path:
    """PneumoniaMNIST in the MedMNIST ``.npz`` layout."""
    return _dataset("pneumoniamnist/pneumoniamnist.npz")


@pytest.fixture
def dicom_samples() -> Path:
    """Real DICOM and PNG/JPEG chest X-ray samples (SIIM, RSNA, NIH, ...)."""
    return _dataset("dicom_samples")
