"""Decode any chest X-ray file to one 8-bit grayscale channel, and fit it to a square.

Everything X-ray specific about pixels lives here (as in torchxrayvision): DICOM modality and
VOI LUTs, MONOCHROME1 inversion, 16-bit rescaling, colour and alpha handling, EXIF orientation,
and the decompression-bomb guard. Every failure raises :class:`InputError` naming the file.
"""

from __future__ import annotations

import os

import hashlib
import io
import logging
import re
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Callable, Literal, NamedTuple, Union, get_args

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

__all__ = ["FIT_MODES", "CONTRASTS", "MAX_PIXELS", "MAX_FILE_BYTES", "IMAGE_SUFFIXES", "NPZ_SEPARATOR",
           "ImageInfo", "load_image", "decoding", "FitGeometry", "fit_geometry", "fit_square",
           "normalize_contrast", "Preprocessing", "preprocess", "probe_image", "content_hash", "is_image_file",
           "gray_array", "read_file", "read_capped", "find_images"]

ImageSource = Union[str, Path, bytes]
FitMode = Literal["pad", "crop"]
Contrast = Literal["none", "clahe"]
FIT_MODES: tuple[str, ...] = get_args(FitMode)
CONTRASTS: tuple[str, ...] = get_args(Contrast)

MAX_PIXELS = 80_000_000
"""Largest image accepted (width x height): about 9000 x 9000. Larger files are refused
before their pixels are decoded, as decompression bombs."""

MAX_FILE_BYTES = 1 << 30
"""Largest file accepted (1 GiB): a larger one is refused from its size alone, before any byte is read.
Every file is also checked from its header (its width and height) before it is read whole."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"})
NPZ_SEPARATOR = "::"
_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112
_REDUCED_FLAGS = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                  (2, cv2.IMREAD_REDUCED_GRAYSCALE_2))


@dataclass(frozen=True)
class ImageInfo:
    """What an image file is, read from its header without decoding the pixels."""

    width: int
    height: int
    format: str
    mode: str
    bit_depth: int
    n_bytes: int
    frames: int = 1
    """Frames of a multi-frame DICOM, all of which its decoder reads (other formats: their first page only)."""


def load_image(source: ImageSource, *, min_side: int | None = None, name: str | None = None) -> np.ndarray:
    """Decode ``source`` (a path, raw bytes, or ``"file.npz::split/index"``) to a 2-D uint8 array.

    With ``min_side``, the decoder may shrink a JPEG by 2, 4 or 8 while decoding (OpenCV's
    reduced-size decoding) as long as its shorter side stays at least ``min_side`` pixels.
    ``name`` labels raw bytes in error messages.
    """
    if isinstance(source, (str, Path)) and NPZ_SEPARATOR in str(source):
        return _load_npz_item(str(source))
    label = name or ("<upload>" if isinstance(source, bytes) else str(source))
    with decoding(label):
        if isinstance(source, bytes):
            data = source
        else:
            info = probe_image(source)  # header first: an oversized image is refused before it is read
            _check_size(info.width, info.height, label, info.frames)
            data = read_file(source)
        if not data:
            raise InputError(label, "empty file (0 bytes)")
        if len(data) > MAX_FILE_BYTES:
            raise InputError(label, f"{len(data):,} bytes exceeds the limit of {MAX_FILE_BYTES:,} bytes")
        if _is_dicom(data, label):
            return _decode_dicom(data, label)
        return _decode_raster(data, label, min_side)


class _DecoderTracebacks(logging.Filter):
    """pydicom's pixel decoders log a traceback for every plugin that fails on a damaged image; the
    failure reaches the caller as one :class:`InputError` line, so the traceback is kept for debug
    logging only (``chestxray`` logger at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.exc_info or logging.getLogger("chestxray").isEnabledFor(logging.DEBUG)


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_DecoderTracebacks())


@contextmanager
def decoding(label: str) -> Iterator[None]:
    """The decoding boundary: any exception a decoder raises (PIL, OpenCV, pydicom and its pixel
    handlers raise dozens of types on damaged files) becomes an :class:`InputError` naming ``label``."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - the boundary: whatever a third-party decoder raises
        raise InputError(label, f"cannot decode the image ({type(err).__name__}: {_one_line(err)})") from None


class FitGeometry(NamedTuple):
    """How :func:`fit_square` places an image in its square: the resize ``scale``, the resized size
    and the offset of the resized image in the square (``pad``) or of the square in it (``crop``)."""

    scale: float
    new_h: int
    new_w: int
    top: int
    left: int


def fit_geometry(height: int, width: int, size: int, mode: FitMode = "pad") -> FitGeometry:
    """The :class:`FitGeometry` of a ``height`` x ``width`` image fitted to a ``size`` square."""
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode must be 'pad' or 'crop', not {mode!r}")
    scale = size / (max(height, width) if mode == "pad" else min(height, width))
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if mode == "crop":
        return FitGeometry(scale, new_h, new_w, (new_h - size) // 2, (new_w - size) // 2)
    return FitGeometry(scale, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2)


def fit_square(image: np.ndarray, size: int, mode: FitMode = "pad") -> np.ndarray:
    """Resize ``image`` to ``size`` x ``size`` keeping its aspect ratio.

    ``pad`` fits the whole image and fills the borders with black; ``crop`` fills the square and
    cuts the centre out of the longer side (:func:`fit_geometry` gives the placement).
    """
    scale, new_h, new_w, top, left = fit_geometry(*image.shape, size, mode)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if mode == "crop":
        return np.ascontiguousarray(resized[top:top + size, left:left + size])
    out = np.zeros((size, size), dtype=np.uint8)
    out[top:top + new_h, left:left + new_w] = resized
    return out


def normalize_contrast(image: np.ndarray, contrast: Contrast = "none") -> np.ndarray:
    """Even out exposure: ``clahe`` is OpenCV's contrast-limited adaptive histogram equalisation
    (clip limit 2, 8 x 8 tiles, the usual setting for chest X-rays; fewer tiles on images too small
    for tiles of 32 pixels, one on a 28-pixel MedMNIST image); ``none`` returns ``image``."""
    if contrast == "none":
        return image
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be 'none' or 'clahe', not {contrast!r}")
    tiles = max(1, min(8, min(image.shape) // 32))
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(tiles, tiles)).apply(image)


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded image becomes the model's input square: one value that the config, the cache
    key, the bundle and every predictor share, so no option can be forgotten on the way.

    ``size``: side of the square; ``mode``: :func:`fit_square`'s ``pad`` or ``crop``;
    ``contrast``: :func:`normalize_contrast`'s ``none`` or ``clahe``.
    """

    size: int
    mode: FitMode = "pad"
    contrast: Contrast = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"image size must be a positive integer, not {self.size!r}")
        if self.mode not in FIT_MODES:
            raise ValueError(f"fit mode must be 'pad' or 'crop', not {self.mode!r}")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"contrast must be 'none' or 'clahe', not {self.contrast!r}")

    @classmethod
    def from_options(cls, size: int, options: dict[str, str]) -> Preprocessing:
        """Rebuild from a bundle's ``image_size`` and ``preprocess`` dict (missing keys: defaults)."""
        unknown = sorted(set(options) - {"mode", "contrast"})
        if unknown:
            raise ValueError(f"unknown preprocessing option(s) {', '.join(unknown)}: made by a newer chestxray?")
        return cls(int(size), **options)

    def options(self) -> dict[str, str]:
        """The options besides the size, as a bundle's ``preprocess`` dict stores them."""
        return {"mode": self.mode, "contrast": self.contrast}

    def key(self) -> str:
        """Stable text of every option, for cache fingerprints (the ``none`` contrast adds nothing,
        so caches made before contrast existed stay valid)."""
        return f"{self.size}|{self.mode}" + ("" if self.contrast == "none" else f"|{self.contrast}")

    def apply(self, image: np.ndarray) -> np.ndarray:
        """A decoded gray image as the model's input: contrast normalised, then fitted to the square."""
        return fit_square(normalize_contrast(image, self.contrast), self.size, self.mode)

    def load(self, source: ImageSource, name: str | None = None) -> np.ndarray:
        """Decode ``source`` (see :func:`load_image`) and :meth:`apply` the options."""
        return self.apply(load_image(source, min_side=self.size, name=name))


def preprocess(source: ImageSource, size: int, mode: FitMode = "pad", *, contrast: Contrast = "none",
               name: str | None = None) -> np.ndarray:
    """Decode ``source`` and turn it into a ``size`` x ``size`` uint8 square: the model's input."""
    return Preprocessing(size, mode, contrast).load(source, name)


def probe_image(path: str | Path) -> ImageInfo:
    """Read the size, format, mode and bit depth of an image from its header, never the whole file
    (a file over :data:`MAX_FILE_BYTES` is refused from its size)."""
    ref = str(path)
    if NPZ_SEPARATOR in ref:
        image = _load_npz_item(ref)
        return ImageInfo(image.shape[1], image.shape[0], "NPZ", "L", 8, image.nbytes)
    path = Path(path)
    n_bytes = _file_size(path)
    with decoding(ref), open(path, "rb") as handle:
        head = handle.read(132)
        handle.seek(0)
        if _is_dicom(head, ref):
            ds = _read_dicom(handle, ref, stop_before_pixels=True)
            with _dicom_errors(ref):
                mode = str(ds.get("PhotometricInterpretation", "?"))
                return ImageInfo(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), "DICOM", mode,
                                 int(ds.get("BitsStored", ds.get("BitsAllocated", 0))), n_bytes,
                                 int(ds.get("NumberOfFrames", 1) or 1))
        with _open_pil(handle, ref) as img:
            return ImageInfo(img.width, img.height, img.format or "?", img.mode, _bit_depth(img), n_bytes)


def content_hash(ref: str) -> str:
    """SHA-256 of a file's bytes, or of the pixels of a MedMNIST ``.npz`` item."""
    if NPZ_SEPARATOR in ref:
        pixels = _load_npz_item(ref)
        return hashlib.sha256(str(pixels.shape).encode() + pixels.tobytes()).hexdigest()
    return hashlib.sha256(Path(ref).read_bytes()).hexdigest()


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has a suffix of a format this module decodes."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_images(root: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files under the folder ``root`` (recursively, sorted), and the folders that could
    not be listed as ``(folder, reason)``: an unreadable folder is reported, never skipped unsaid."""
    unreadable: list[tuple[str, str]] = []

    def failed(err: OSError) -> None:
        unreadable.append((str(err.filename or root), f"cannot read this folder ({err.strerror or err})"))

    files = [str(Path(folder) / name) for folder, _, names in os.walk(root, onerror=failed, followlinks=True) for name in names]
    return sorted(f for f in files if Path(f).is_file() and is_image_file(Path(f))), sorted(unreadable)


def _one_line(err: BaseException) -> str:
    """A library's error text on one line (some, like pydicom's, span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def _file_size(path: Path) -> int:
    """The size of an image file, refused when missing, not a file, empty or over :data:`MAX_FILE_BYTES`."""
    if not path.exists():
        raise InputError(path, "no such file")
    if not path.is_file():
        raise InputError(path, "not a file")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise InputError(path, f"cannot read ({err.strerror or err})") from None
    if size == 0:
        raise InputError(path, "empty file (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise InputError(path, f"file of {size:,} bytes exceeds the limit of {MAX_FILE_BYTES:,} bytes")
    return size


def read_file(path: str | Path) -> bytes:
    """The bytes of an input file, checked before any byte is read: a missing path, anything but a
    regular file (a device such as ``/dev/zero``, a FIFO, a folder), an empty file or one over
    :data:`MAX_FILE_BYTES` is refused (:class:`InputError`); the read itself stops past the limit too
    (a file that grew meanwhile). The one guard for every path that reads a whole input file."""
    path = Path(path)
    size = _file_size(path)
    try:
        with open(path, "rb") as handle:
            return read_capped(handle.read, path, limit=MAX_FILE_BYTES, expected=size)
    except OSError as err:
        raise InputError(path, f"cannot read ({err.strerror or err})") from None


_CHUNK = 1 << 20


def read_capped(read: Callable[[int], bytes], label: str | Path, *, limit: int = MAX_FILE_BYTES,
                deadline: float | None = None, expected: int | None = None, what: str = "file") -> bytes:
    """Every byte of a stream, with the limits every input path shares: ``read(n)`` (a file's, an HTTP
    answer's, a socket's) is called until it returns nothing; more than ``limit`` bytes, or still
    reading past ``deadline`` (a :func:`time.monotonic` time), is refused (:class:`InputError`
    naming ``label``) as soon as it happens, so memory never holds more than ``limit`` bytes read.
    ``expected`` (a file's size) lets a regular file be read in one call."""
    if expected is not None and expected <= limit:
        first = read(expected + 1)  # the common case: one read, no copy
        more = read(1) if len(first) <= expected else b""
        if len(first) <= expected and not more:
            return first
        chunks, received = [first, more], len(first) + len(more)
    else:
        chunks, received = [], 0
    while received <= limit:
        if deadline is not None and time.monotonic() > deadline:
            raise InputError(label, f"{what} not received in time ({received:,} bytes came before the deadline)")
        chunk = read(min(_CHUNK, limit + 1 - received))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        received += len(chunk)
    raise InputError(label, f"{what} of over {limit:,} bytes exceeds the limit of {limit:,} bytes")


def _is_dicom(data: bytes, label: str) -> bool:
    return data[128:132] == b"DICM" or label.lower().endswith((".dcm", ".dicom"))


def _check_size(width: int, height: int, label: str, frames: int = 1) -> None:
    if width <= 0 or height <= 0:
        raise InputError(label, f"invalid image size {width}x{height}")
    if width * height * max(frames, 1) > MAX_PIXELS:
        size = f"{width}x{height}" + (f"x{frames} frames" if frames > 1 else "")
        raise InputError(label, f"image of {size} pixels exceeds the limit of "
                                f"{MAX_PIXELS:,} pixels (decompression-bomb guard)")


def _open_pil(data: bytes | BinaryIO, label: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except UnidentifiedImageError:
        raise InputError(label, "not a readable image (unrecognised or corrupt format)") from None
    except Image.DecompressionBombError as err:  # PIL's own limit is higher: quote the documented one
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)):,} pixels" if found else "more pixels"
        raise InputError(label, f"image of {size} exceeds the limit of {MAX_PIXELS:,} pixels "
                                "(decompression-bomb guard)") from None
    except OSError as err:  # e.g. a header cut short
        raise InputError(label, f"corrupt or truncated image header ({_one_line(err)})") from None


def _bit_depth(img: Image.Image) -> int:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return 16
    if img.mode in ("I", "F"):
        return 32
    return 1 if img.mode == "1" else 8


def _to_uint8(pixels: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Rescale any numeric array linearly from ``value_range`` (default: its own min..max) to 0..255."""
    pixels = pixels.astype(np.float32)
    low, high = value_range or (float(pixels.min()), float(pixels.max()))
    if high <= low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    return np.round(np.clip((pixels - low) * (255.0 / (high - low)), 0, 255)).astype(np.uint8)


def _decode_raster(data: bytes, label: str, min_side: int | None) -> np.ndarray:
    with _open_pil(data, label) as img:
        _check_size(img.width, img.height, label)
        if data.startswith(_JPEG_MAGIC):
            if not data.rstrip(b"\x00")[-2:] == b"\xff\xd9":
                raise InputError(label, "truncated JPEG (no end-of-image marker)")
            upright = img.getexif().get(_EXIF_ORIENTATION, 1) == 1
            fast = _decode_jpeg_reduced(data, min(img.width, img.height), min_side) if upright else None
            if fast is not None:
                return fast
        try:
            img = ImageOps.exif_transpose(img)
            return _pil_to_gray(img)
        except (OSError, ValueError, SyntaxError) as err:
            raise InputError(label, f"corrupt or truncated image data ({_one_line(err)})") from None


def _decode_jpeg_reduced(data: bytes, shorter_side: int, min_side: int | None) -> np.ndarray | None:
    """OpenCV's DCT-domain reduced decoding; ``None`` when no reduction fits ``min_side``."""
    if not min_side:
        return None
    for factor, flag in _REDUCED_FLAGS:
        if shorter_side // factor >= min_side:
            return cv2.imdecode(np.frombuffer(data, np.uint8), flag)  # None if corrupt: PIL decides
    return None


def gray_array(array: np.ndarray, name: str = "<array>") -> np.ndarray:
    """A 2-D uint8 image from a gray (H, W), RGB (H, W, 3) or RGBA (H, W, 4) uint8 array, converted
    exactly as a decoded file of the same pixels is (alpha composited on black, ITU-R 601 luma)."""
    if array.dtype != np.uint8:
        raise InputError(name, f"expected a uint8 image array, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] in (3, 4) and min(array.shape[:2]) > 0:
        return _pil_to_gray(Image.fromarray(np.ascontiguousarray(array), "RGBA" if array.shape[2] == 4 else "RGB"))
    if array.ndim != 2 or min(array.shape) == 0:
        raise InputError(name, f"expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {array.shape}")
    return array


def _pil_to_gray(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(img)
        if img.mode.startswith("I;16"):
            return _to_uint8(pixels.astype(np.uint16))
        return _to_uint8(pixels)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    if img.mode == "CMYK":
        img = img.convert("RGB")
    return np.asarray(img.convert("L"), dtype=np.uint8).copy()


def _read_dicom(data: bytes | BinaryIO, label: str, *, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data) if isinstance(data, bytes) else data, force=True,
                               stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError) as err:
        raise InputError(label, f"not a readable DICOM file ({_one_line(err)})") from None


@contextmanager
def _dicom_errors(label: str) -> Iterator[None]:
    """Turn any pydicom failure into an :class:`InputError`: it parses lazily, so reading a
    tag or the pixels of a broken file raises many exception types."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:
        raise InputError(label, f"cannot decode DICOM data ({_one_line(err)})") from None


def _decode_dicom(data: bytes, label: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = _read_dicom(data, label)
    if "PixelData" not in ds:
        raise InputError(label, "DICOM file has no pixel data")
    with _dicom_errors(label):
        _check_size(int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), label, int(ds.get("NumberOfFrames", 1) or 1))
        pixels = ds.pixel_array
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            pixels = pixels[0]
        if pixels.ndim == 3:  # colour: pydicom has already converted YBR to RGB
            return _to_uint8(cv2.cvtColor(np.ascontiguousarray(pixels, dtype=np.float32), cv2.COLOR_RGB2GRAY))
        pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
        has_voi = "VOILUTSequence" in ds or ("WindowCenter" in ds and "WindowWidth" in ds)
        # a window maps onto a fixed output range: keep it, so that a soft image stays soft
        low, high = apply_voi_lut(np.array([-1e12, 1e12]), ds) if has_voi else (None, None)
    gray = _to_uint8(pixels, None if low is None else (float(low), float(high)))
    return 255 - gray if photometric == "MONOCHROME1" else gray


@lru_cache(maxsize=4)
def _npz_arrays(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files if k.endswith("_images")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InputError(path, f"not a readable .npz file ({_one_line(err)})") from None


def _load_npz_item(ref: str) -> np.ndarray:
    path, _, key = ref.rpartition(NPZ_SEPARATOR)
    split, _, index = key.partition("/")
    arrays = _npz_arrays(path)
    images = arrays.get(f"{split}_images")
    if images is None or not index.isdigit() or int(index) >= len(images):
        raise InputError(ref, "no such image in the .npz file")
    image = images[int(index)]
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image.copy() if image.dtype == np.uint8 else _to_uint8(image)  # never a view of the cached array
