"""Writing files so that a failure (a full disk, a missing folder, no permission) leaves nothing half
written and says which path and why, in one line.

Every output of chestxray (cache, run folder, checkpoints, bundle, reports, prediction tables) is
written to a temporary name beside its target and renamed onto it when complete.
"""

from __future__ import annotations

__all__ = ["write_error", "temporary_name", "atomic_path", "write_text", "write_bytes", "make_folder", "staged_folder",
           "reserve"]

import errno
import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import ChestXrayError

_HINTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
          errno.EROFS: "the file system is read-only", errno.EACCES: "no permission",
          errno.ENOENT: "its folder does not exist"}


def write_error(path: str | Path, err: OSError, what: str = "write") -> ChestXrayError:
    """A one-line error naming ``path`` and the reason of ``err`` (e.g. "the disk is full")."""
    reason = err.strerror or str(err) or type(err).__name__
    hint = _HINTS.get(err.errno or -1)
    return ChestXrayError(f"{path}: cannot {what} ({reason}{'; ' + hint if hint else ''})")


def temporary_name(path: str | Path) -> Path:
    """A hidden name beside ``path``, unique to this process and thread."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it is renamed onto ``path`` when the block
    ends without error and removed otherwise. An ``OSError`` becomes a :func:`write_error`."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(path, err) from None
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def make_folder(path: str | Path, what: str = "folder") -> Path:
    """``mkdir -p path``; an ``OSError`` becomes one line naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path, err, f"create the {what}") from None
    return path


@contextmanager
def staged_folder(path: str | Path, last: str = "model.json") -> Iterator[Path]:
    """Yield a hidden folder beside ``path`` to fill; when the block ends without error its files take
    their places in ``path`` (a rename when ``path`` is absent or empty; else file by file, ``last``
    last, so that a bundle's ``model.json``, whose sha256s name the other files, lands after them).
    A folder left by a killed run is removed first; on an error the staged files are removed, so
    ``path`` never holds half of a new output."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial")
    try:
        if staging.exists():
            shutil.rmtree(staging)  # the remains of an interrupted run
        make_folder(staging, "staging folder")
        yield staging
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        if not path.exists():
            os.rename(staging, path)
        else:
            for name in sorted((p.name for p in staging.iterdir()), key=lambda n: n == last):
                os.replace(staging / name, path / name)
    except OSError as err:
        raise write_error(path, err) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def reserve(handle_or_fd, size: int, path: str | Path) -> None:
    """Allocate ``size`` bytes of a file on disk now (``posix_fallocate``), so that a full disk is an
    error here rather than a SIGBUS when a memory map of the file is written later."""
    fd = handle_or_fd if isinstance(handle_or_fd, int) else handle_or_fd.fileno()
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: nothing reserved
            return
        raise write_error(path, err) from None
