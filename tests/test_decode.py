"""Decoding every format to one uint8 channel, DICOM LUTs, the JPEG fast path, and bad input."""

from __future__ import annotations

import io
import struct
import sys
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile

from chestxray.data.decode import (MAX_PIXELS, Preprocessing, fit_geometry, fit_square, gray_array, load_image,
                              normalize_contrast, preprocess, probe_image)
from chestxray.errors import InputError


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 grey level of RGB pixels, as float."""
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def stretch(values: np.ndarray) -> np.ndarray:
    """Linear min..max -> 0..255, as float."""
    values = values.astype(np.float64)
    return (values - values.min()) * 255 / (values.max() - values.min())


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def assert_one_line_error(err: pytest.ExceptionInfo, name: str, reason: str) -> None:
    message = str(err.value)
    assert isinstance(err.value, InputError)
    assert name in message and reason in message.lower() and "\n" not in message, message


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tiff"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_lossless_formats_give_the_exact_grey_levels(make_image, xray, suffix, mode):
    image = load_image(make_image(f"x{suffix}", mode=mode))
    assert image.dtype == np.uint8 and image.ndim == 2
    np.testing.assert_array_equal(image, xray())


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_decodes_close_to_the_original(make_image, xray, mode):
    image = load_image(make_image("x.jpg", mode=mode, quality=95))
    assert image.shape == xray().shape and mean_abs_diff(image, xray()) < 2


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_16_bit_images_are_rescaled_not_truncated(make_image, xray, suffix):
    pixels = xray().astype(np.uint16) * 200 + 1000  # 7000..52000: neither byte alone is the picture
    image = load_image(make_image(f"x16{suffix}", pixels))
    assert probe_image(make_image(f"p16{suffix}", pixels)).bit_depth == 16
    assert np.abs(image - stretch(pixels)).max() <= 1


PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)


@pytest.mark.parametrize("transparent_index", [None, 0])
def test_palette_png_is_converted_through_its_colours(tmp_path, transparent_index):
    indices = np.arange(8 * 8, dtype=np.uint8).reshape(8, 8) % len(PALETTE)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(PALETTE.ravel().tolist())
    options = {} if transparent_index is None else {"transparency": transparent_index}
    image.save(tmp_path / "p.png", **options)
    expected = luma(PALETTE[indices])
    if transparent_index is not None:  # transparent pixels are composited on black
        expected[indices == transparent_index] = 0
    assert np.abs(load_image(tmp_path / "p.png") - expected).max() <= 1


def test_rgba_is_composited_on_black(make_image, xray):
    rgb = np.stack([xray(), xray()[::-1], np.full_like(xray(), 90)], axis=-1)
    alpha = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None, :].repeat(rgb.shape[0], 0)
    image = load_image(make_image("rgba.png", np.dstack([rgb, alpha])))
    assert np.abs(image - luma(rgb) * alpha / 255).max() <= 2


@pytest.mark.parametrize("orientation, turns", [(3, 2), (6, -1), (8, 1)])
@pytest.mark.parametrize("min_side", [None, 8])
def test_exif_orientation_is_applied(make_image, xray, orientation, turns, min_side):
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = load_image(make_image("rotated.jpg", exif=exif, quality=95), min_side=min_side)
    upright = np.rot90(xray(), turns)
    assert image.shape == upright.shape
    assert mean_abs_diff(image, upright) < 3


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_jpeg_fast_path_matches_full_decode_and_resize(make_image, xray, mode):
    path = make_image("big.jpg", xray(480, 640), quality=90)
    assert load_image(path, min_side=64).shape == (120, 160)  # decoded at 1/4 size in the DCT domain
    assert load_image(path).shape == (480, 640)
    assert mean_abs_diff(preprocess(path, 64, mode), fit_square(load_image(path), 64, mode)) < 2


def test_fit_square_pads_with_black_or_crops_the_centre():
    wide = np.full((20, 40), 200, dtype=np.uint8)
    padded, cropped = fit_square(wide, 10, "pad"), fit_square(wide, 10, "crop")
    assert padded.shape == cropped.shape == (10, 10)
    assert np.flatnonzero(padded.any(axis=1)).tolist() == [2, 3, 4, 5, 6] and padded.any(axis=0).all()
    assert (cropped == 200).all()
    with pytest.raises(ValueError):
        fit_square(wide, 10, "stretch")


def test_clahe_spreads_a_washed_out_image_and_none_leaves_it(xray):
    washed = (120 + xray(seed=3) // 8).astype(np.uint8)  # grey levels squeezed into 120..151
    assert normalize_contrast(washed, "none") is washed
    equalised = normalize_contrast(washed, "clahe")
    assert equalised.shape == washed.shape and equalised.dtype == np.uint8
    assert np.ptp(equalised) > 2 * np.ptp(washed)
    assert np.corrcoef(equalised.ravel(), washed.ravel())[0, 1] > 0.5  # same picture, more contrast
    assert (Preprocessing(32, "pad", "clahe").apply(washed) == fit_square(equalised, 32, "pad")).all()
    with pytest.raises(ValueError):
        normalize_contrast(washed, "gamma")


def test_preprocessing_options_round_trip_and_bad_ones_are_named() -> None:
    prep = Preprocessing(64, "crop", "clahe")
    assert Preprocessing.from_options(64, prep.options()) == prep
    assert Preprocessing.from_options(64, {"mode": "pad"}) == Preprocessing(64)  # bundles made before contrast
    assert Preprocessing(64).key() == "64|pad" and prep.key() == "64|crop|clahe"
    for bad, message in (({"size": 0}, "image size"), ({"size": 8, "mode": "stretch"}, "fit mode"),
                         ({"size": 8, "contrast": "gamma"}, "contrast")):
        with pytest.raises(ValueError, match=message):
            Preprocessing(**bad)
    with pytest.raises(ValueError, match="unknown preprocessing option.*lung_mask"):
        Preprocessing.from_options(64, {"mode": "pad", "lung_mask": "yes"})


def test_bytes_decode_like_the_file_and_errors_use_the_given_name(make_image):
    path = make_image("x.png")
    np.testing.assert_array_equal(load_image(path.read_bytes(), name="upload.png"), load_image(path))
    with pytest.raises(InputError) as err:
        load_image(b"not an image", name="upload.png")
    assert_one_line_error(err, "upload.png", "not a readable image")


def dicom_gradient() -> np.ndarray:
    return (np.indices((32, 40)).sum(axis=0) * 4000 // 70).astype(np.uint16)  # 0..4000


def test_dicom_16_bit_monochrome2_is_stretched(make_dicom):
    pixels = dicom_gradient()
    assert np.abs(load_image(make_dicom("plain.dcm", pixels, BitsStored=12)) - stretch(pixels)).max() <= 1


def test_dicom_rescale_slope_intercept_and_window_are_applied(make_dicom):
    pixels = dicom_gradient()
    center, width = 1000.0, 2000.0
    path = make_dicom("ct.dcm", pixels, BitsStored=12, RescaleSlope=2, RescaleIntercept=-1000,
                      WindowCenter=center, WindowWidth=width)
    value = pixels * 2.0 - 1000  # -1000..7000: the window [0, 2000] clips both ends
    expected = np.clip((value - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    assert np.abs(load_image(path) - expected).max() <= 1.5


def test_dicom_window_keeps_its_output_range(make_dicom):
    pixels = (900 + dicom_gradient() % 201).astype(np.uint16)  # 900..1100: well inside the window
    path = make_dicom("soft.dcm", pixels, BitsStored=12, WindowCenter=1000.0, WindowWidth=2000.0)
    image = load_image(path)
    expected = ((pixels - 999.5) / 1999 + 0.5) * 255  # a soft image stays soft: no stretch to 0..255
    assert np.abs(image - expected).max() <= 1.5 and 100 < image.min() and image.max() < 155


def test_dicom_monochrome1_is_inverted(make_dicom):
    pixels = dicom_gradient()
    normal = load_image(make_dicom("m2.dcm", pixels, "MONOCHROME2"))
    inverted = load_image(make_dicom("m1.dcm", pixels, "MONOCHROME1"))
    np.testing.assert_array_equal(inverted.astype(int), 255 - normal.astype(int))


@pytest.mark.parametrize("photometric", ["RGB", "YBR_FULL"])
def test_colour_dicom_is_converted_through_its_colours(make_dicom, xray, photometric):
    from pydicom.pixels import convert_color_space

    rgb = np.stack([xray(), xray()[::-1], np.full_like(xray(), 90)], axis=-1)
    stored = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", photometric)
    image = load_image(make_dicom("colour.dcm", stored, photometric))
    assert mean_abs_diff(image, stretch(luma(rgb))) < 2  # YBR round trip in uint8 costs a little


def test_compressed_dicom_decodes_like_the_uncompressed_one(make_dicom):
    from pydicom.uid import RLELossless

    pixels = dicom_gradient()
    compressed = make_dicom("rle.dcm", pixels, compress=RLELossless)
    assert pydicom.dcmread(compressed).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(load_image(compressed), load_image(make_dicom("raw.dcm", pixels)))


def test_probe_reads_the_header(make_image, make_dicom):
    png = probe_image(make_image("x.png", mode="RGBA"))
    assert (png.width, png.height, png.format, png.mode, png.bit_depth) == (64, 48, "PNG", "RGBA", 8)
    dcm = probe_image(make_dicom("x.dcm", dicom_gradient(), "MONOCHROME1", BitsStored=12))
    assert (dcm.width, dcm.height, dcm.format, dcm.mode, dcm.bit_depth) == (40, 32, "DICOM", "MONOCHROME1", 12)


def test_medmnist_reference_decodes_to_a_private_copy(tmp_path, xray):
    images = np.stack([xray(seed=i) for i in range(3)])
    np.savez(tmp_path / "m.npz", train_images=images, train_labels=np.zeros((3, 1)))
    ref = f"{tmp_path / 'm.npz'}::train/2"
    image = load_image(ref)
    np.testing.assert_array_equal(image, images[2])
    image[:] = 0  # must not reach the arrays kept in memory for the next call
    np.testing.assert_array_equal(load_image(ref), images[2])


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _broken_jpeg_dicom(make_dicom):
    """A DICOM whose JPEG-compressed pixel data is garbage (pydicom reports it on several lines)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    path = make_dicom("broken.dcm", np.zeros((8, 8), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + b"\0" * 50 + b"\xff\xd9"])
    ds.save_as(path)
    return path


def _bad_input(case: str, folder, make_image, make_dicom, xray):
    """A file (or reference) that is broken in the way ``case`` says."""
    if case == "missing":
        return folder / "nope.png"
    if case == "folder":
        return folder
    if case == "zero-byte":
        return _write(folder / "empty.png", b"")
    if case == "text-as-png":
        return _write(folder / "notes.png", b"patient list\n")
    if case == "truncated-jpeg":
        whole = make_image("whole.jpg", xray(192, 256)).read_bytes()
        return _write(folder / "cut.jpg", whole[: len(whole) // 2])
    if case == "truncated-png-header":
        return _write(folder / "cut.png", make_image("whole.png").read_bytes()[:20])
    if case == "dicom-without-pixels":
        return make_dicom("empty.dcm", dicom_gradient(), pixel_data=False)
    if case == "dicom-broken-pixels":
        return _broken_jpeg_dicom(make_dicom)
    assert case == "npz-reference"
    return f"{folder / 'missing.npz'}::train/0"


BAD_INPUTS = {"missing": "no such file", "folder": "not a file", "zero-byte": "empty file",
              "text-as-png": "not a readable image", "truncated-jpeg": "truncated",
              "truncated-png-header": "truncated", "dicom-without-pixels": "no pixel data",
              "dicom-broken-pixels": "cannot decode dicom",
              "npz-reference": "not a readable .npz"}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_one_line_naming_the_file(tmp_path, make_image, make_dicom, xray, case):
    source = _bad_input(case, tmp_path, make_image, make_dicom, xray)
    with pytest.raises(InputError) as err:
        load_image(source, min_side=8)
    assert_one_line_error(err, str(source).split("::")[0], BAD_INPUTS[case])


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds a few bytes of pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _peak_rss_mib() -> float:
    """This process's peak memory so far (0 where the platform does not say: Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("suffix, side", [(".png", 30000), (".png", 9500), (".dcm", 30000)])
def test_huge_images_are_refused_from_the_header(tmp_path, make_dicom, monkeypatch, suffix, side):
    assert side * side > MAX_PIXELS
    if suffix == ".png":
        path = _write(tmp_path / f"bomb{suffix}", _png_header(side, side))
    else:
        path = make_dicom("bomb.dcm", np.zeros((2, 2), np.uint8), Rows=side, Columns=side)

    def never(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(never))
    peak_before = _peak_rss_mib()
    with pytest.raises(InputError) as err:
        preprocess(path, 224)
    assert_one_line_error(err, path.name, "decompression")
    assert _peak_rss_mib() - peak_before < 100


def test_real_samples_all_decode(dicom_samples):
    files = sorted(p for p in dicom_samples.iterdir() if p.suffix.lower() in (".dcm", ".png", ".jpg"))
    assert sum(p.suffix == ".dcm" for p in files) >= 3
    for path in files:
        image = load_image(path)
        assert image.dtype == np.uint8 and image.ndim == 2 and image.std() > 10, path.name


def test_real_compressed_dicom_and_its_monochrome1_copy(dicom_samples):
    siim = next(dicom_samples.glob("siim_1.*.dcm"))
    assert pydicom.dcmread(siim, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    normal, inverted = load_image(siim), load_image(dicom_samples / "siim_fake_MONOCHROME1.dcm")
    np.testing.assert_array_equal(inverted.astype(int), 255 - normal.astype(int))


def test_real_large_jpeg_fast_path(dicom_samples):
    path = next(dicom_samples.glob("ieee8023_*.jpg"))
    full = load_image(path)
    assert load_image(path, min_side=256).shape[0] < full.shape[0]
    assert mean_abs_diff(preprocess(path, 256), fit_square(full, 256)) < 2


# ------------------------------------------------------------------ hardening (issue 17)

def test_damaged_files_are_refused_at_the_decoding_boundary(tmp_path):
    from fuzzing import damaged_files

    for name, data in damaged_files().items():
        with pytest.raises(InputError) as err:
            load_image(data, name=name)
        assert_one_line_error(err, name, "")
        path = tmp_path / name
        path.write_bytes(data)
        try:
            probe_image(path)
        except InputError:
            pass  # a header damaged beyond reading is refused the same way


def test_any_exception_of_a_decoder_becomes_an_input_error(monkeypatch, make_image):
    import chestxray.data.decode as decode

    def broken(*args, **kwargs):
        raise OverflowError("Python int too large to convert to C long")

    monkeypatch.setattr(decode, "_pil_to_gray", broken)
    with pytest.raises(InputError) as err:
        load_image(make_image("x.png"))
    assert_one_line_error(err, "x.png", "overflowerror")


def _never_read_whole(monkeypatch):
    from pathlib import Path

    def whole(self):
        raise AssertionError(f"{self} was read whole")

    monkeypatch.setattr(Path, "read_bytes", whole)


def test_a_sparse_file_over_the_size_limit_is_refused_without_reading_it(tmp_path, monkeypatch):
    from chestxray.data.decode import MAX_FILE_BYTES

    path = tmp_path / "sparse.png"
    with open(path, "wb") as handle:  # a valid small PNG header, then 3 GB of holes
        handle.write(_png_header(64, 64))
        handle.truncate(3 * 2**30)
    assert path.stat().st_size > MAX_FILE_BYTES
    _never_read_whole(monkeypatch)
    for call in (load_image, probe_image):
        with pytest.raises(InputError) as err:
            call(path)
        assert_one_line_error(err, "sparse.png", "exceeds the limit")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_the_header_is_checked_before_the_file_is_read(tmp_path, monkeypatch):
    path = tmp_path / "claims.png"
    with open(path, "wb") as handle:  # under the byte limit, but its header claims 12000 x 12000 pixels
        handle.write(_png_header(12000, 12000))
        handle.truncate(200 * 2**20)
    _never_read_whole(monkeypatch)
    with pytest.raises(InputError) as err:
        load_image(path)
    assert_one_line_error(err, "claims.png", "decompression")
    assert probe_image(path).width == 12000  # the probe reads the header only


@pytest.mark.parametrize("channels", [3, 4])
def test_an_array_and_a_file_of_the_same_pixels_give_the_same_gray_image(channels: int) -> None:
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 256, (30, 20, channels), dtype=np.uint8)
    if channels == 4:
        pixels[..., 3] = np.linspace(0, 255, 20, dtype=np.uint8)  # every opacity, from clear to opaque
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    assert np.array_equal(gray_array(pixels), load_image(buffer.getvalue()))
    with pytest.raises(InputError, match="uint8"):
        gray_array(pixels.astype(np.float32))
    with pytest.raises(InputError, match="shape"):
        gray_array(pixels[..., :2])


def test_fit_geometry_places_the_image_as_fit_square_does() -> None:
    image = np.full((50, 100), 200, np.uint8)
    _, new_h, new_w, top, left = fit_geometry(50, 100, 64, "pad")
    square = fit_square(image, 64, "pad")
    assert (new_h, new_w) == (32, 64) and square[top:top + new_h, left:left + new_w].min() == 200
    assert square[:top].max() == 0 and square[top + new_h:].max() == 0
