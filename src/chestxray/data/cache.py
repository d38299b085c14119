"""Decode and resize every image once into a uint8 memory-mapped array on disk.

The cache file is keyed by a fingerprint of each file's identity (path, size, modification time)
and of every preprocessing option, so a changed file or option builds a new cache and a warm run
only opens a memory map. It never writes into the data folder.

A cache is published by renaming a complete file into place; its disk space is reserved before
any pixel is written (a full disk is an error naming the folder, never a SIGBUS of the memory map);
a CRC-32 of its pixels is checked each time it is opened, and a cache that fails it is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..console import make_console
from .decode import NPZ_SEPARATOR, Preprocessing
from ..errors import ChestXrayError, InputError
from .sources import Samples
from ..storage import make_folder, reserve, write_error, write_text

__all__ = ["ImageCache", "default_cache_dir", "fingerprint", "build_cache"]

CACHE_VERSION = 1
_console = make_console(stderr=True)
_INLINE_BELOW = 64  # fewer images than this are decoded in-process: a pool costs more than it saves
_CHECKSUM_BLOCK = 64 * 2**20  # bytes of pixels per CRC-32 step


@dataclass
class ImageCache:
    """Preprocessed images aligned with the rows of the samples they were built from."""

    images: np.ndarray
    failed: dict[int, str]
    preprocessing: Preprocessing
    fingerprint: str
    path: Path

    @property
    def ok(self) -> np.ndarray:
        """Boolean mask of the rows that decoded."""
        mask = np.ones(len(self.images), dtype=bool)
        mask[list(self.failed)] = False
        return mask


def default_cache_dir() -> Path:
    """``$CHESTXRAY_CACHE``, else ``$XDG_CACHE_HOME/chestxray``, else ``~/.cache/chestxray``."""
    if os.environ.get("CHESTXRAY_CACHE"):
        return Path(os.environ["CHESTXRAY_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "chestxray"


def fingerprint(paths: list[str], preprocessing: Preprocessing) -> str:
    """Hash of every file's path, size and mtime plus the preprocessing options."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{preprocessing.key()}".encode())
    for ref in paths:
        file = ref.rpartition(NPZ_SEPARATOR)[0] or ref
        try:
            stat = os.stat(file)
            identity = f"{os.path.abspath(file)}|{ref}|{stat.st_size}|{stat.st_mtime_ns}"
        except OSError:
            identity = f"{ref}|missing"
        digest.update(identity.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:24]


def build_cache(samples: Samples, preprocessing: Preprocessing | int, *, cache_dir: str | Path | None = None,
                workers: int | None = None, progress: bool = True) -> ImageCache:
    """Preprocess every sample once (an ``int``: that size, default options); later calls open the
    stored memory map.

    Files that fail to decode are listed in ``ImageCache.failed`` with the reason; the others
    are still cached. Processes building the same cache at once (the ranks of a distributed run)
    wait for the first one and open what it built.
    """
    prep = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing(preprocessing)
    paths = samples.frame["path"].tolist()
    key = fingerprint(paths, prep)
    directory = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    array_path, meta_path = directory / f"{key}.npy", directory / f"{key}.json"
    shape = (len(paths), prep.size, prep.size)
    if (cache := _open(array_path, meta_path, shape, prep, key)) is not None:
        return cache
    make_folder(directory, "cache folder")
    with _exclusive(directory / f"{key}.lock"):
        if (cache := _open(array_path, meta_path, shape, prep, key)) is not None:
            return cache  # built by another process while this one waited
        if array_path.is_file():
            _console.print(f"[yellow]{array_path}: damaged cache file, rebuilding it[/]")
        _write(array_path, meta_path, paths, prep, shape, workers, progress)
    cache = _open(array_path, meta_path, shape, prep, key)
    if cache is None:
        raise ChestXrayError(f"{array_path}: the cache just written cannot be read back (disk full?)")
    return cache


def pixel_checksum(images: np.ndarray) -> str:
    """CRC-32 of every pixel of a cache array, read in blocks (a memory map is never loaded whole)."""
    rows = max(1, _CHECKSUM_BLOCK // max(1, images[0].nbytes)) if len(images) else 1
    crc = 0
    for start in range(0, len(images), rows):
        crc = zlib.crc32(np.ascontiguousarray(images[start:start + rows]).data, crc)
    return f"crc32:{crc:08x}"


def _write(array_path: Path, meta_path: Path, paths: list[str], prep: Preprocessing, shape: tuple[int, int, int],
           workers: int | None, progress: bool) -> None:
    """Decode every image into a temporary array, then publish it (metadata first, array last).
    On any failure nothing of it is left behind; an ``OSError`` names the path and the reason."""
    tmp_path = array_path.with_name(f"{array_path.stem}.{os.getpid()}.tmp.npy")
    try:
        images = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=shape)
        with open(tmp_path, "r+b") as handle:
            reserve(handle, tmp_path.stat().st_size, array_path.parent)
        failed: dict[int, str] = {}
        for row, image, reason in _decode_all(paths, prep, workers, progress):
            if image is None:
                failed[row] = reason
            else:
                images[row] = image
        images.flush()
        checksum = pixel_checksum(images)
        del images
        write_text(meta_path, json.dumps({"size": prep.size, **prep.options(), "n": len(paths), "failed": failed,
                                          "checksum": checksum}))
        os.replace(tmp_path, array_path)  # last: the array's appearance publishes a complete cache
    except OSError as err:
        meta_path.unlink(missing_ok=True)
        raise write_error(array_path.parent, err, "write the cache") from None
    except BaseException:
        meta_path.unlink(missing_ok=True)
        raise
    finally:
        tmp_path.unlink(missing_ok=True)  # an interrupted build leaves nothing behind


def _open(array_path: Path, meta_path: Path, shape: tuple[int, int, int], preprocessing: Preprocessing,
          key: str) -> ImageCache | None:
    """The stored cache, or ``None`` when it is missing or damaged (truncated, wrong shape, bad JSON)."""
    if not (array_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        failed = {int(k): str(v) for k, v in meta["failed"].items()}
        images = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if images.shape != shape or images.dtype != np.uint8 or meta.get("checksum") != pixel_checksum(images):
        return None  # a cache without a checksum predates it: rebuilt once
    return ImageCache(images, failed, preprocessing, key, array_path)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the file is removed on release."""
    try:
        handle = open(lock_path, "w")
    except OSError as err:
        raise write_error(lock_path, err, "create the cache lock") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def _decode_one(job: tuple[int, str, Preprocessing]) -> tuple[int, np.ndarray | None, str]:
    row, path, preprocessing = job
    try:
        return row, preprocessing.load(path), ""
    except InputError as err:
        return row, None, err.reason
    except Exception as err:  # a decoder bug on one file must not lose the others
        return row, None, f"{type(err).__name__}: {err}"


def _decode_all(paths: list[str], preprocessing: Preprocessing, workers: int | None, progress: bool):
    jobs = [(row, path, preprocessing) for row, path in enumerate(paths)]
    workers = workers or os.cpu_count() or 1
    columns = [TextColumn("caching {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=_console, disable=not progress, transient=True) as bar:
        task = bar.add_task(f"{len(jobs)} images at {preprocessing.size}px", total=len(jobs))
        if workers == 1 or len(jobs) < _INLINE_BELOW:
            results = map(_decode_one, jobs)
            pool = None
        else:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_limit_worker_threads)
            results = pool.map(_decode_one, jobs, chunksize=max(1, min(32, len(jobs) // (8 * workers))))
        try:
            for result in results:
                bar.advance(task)
                yield result
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)


def _limit_worker_threads() -> None:
    import cv2

    cv2.setNumThreads(1)
