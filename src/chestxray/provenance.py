"""Where a model came from: its weights' SHA-256, the software versions and the git commit it was
trained with, and the one model id that every result (CSV row, API answer, DICOM SR, audit line) names."""

from __future__ import annotations

__all__ = ["file_sha256", "describe", "model_id", "git_commit"]

import hashlib
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(weights: str | Path) -> dict[str, Any]:
    """The ``provenance`` of a bundle whose weights file is ``weights``: its sha256, the chestxray,
    torch, timm and Python versions, and the git commit of the source tree (``None`` outside a git
    checkout; ``+dirty`` when it had uncommitted changes)."""
    return {"weights_sha256": file_sha256(weights), "package_version": __version__,
            "torch_version": _version("torch"), "timm_version": _version("timm"),
            "python_version": platform.python_version(), "git_commit": git_commit()}


def model_id(arch: str, weights_sha256: str) -> str:
    """``<arch>@<first 12 hex digits of the weights' sha256>``: which exact weights answered."""
    return f"{arch or 'model'}@{weights_sha256[:12]}"


def git_commit(directory: str | Path | None = None) -> str | None:
    """HEAD of the git checkout holding ``directory`` (default: this package's source), ``None`` if none."""
    where = str(directory or Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head or None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
