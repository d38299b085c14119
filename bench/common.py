"""Shared by the bench scripts: where results go and what machine they came from."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(os.environ.get("CHESTXRAY_DATA") or Path(__file__).resolve().parents[2] / "shared" / "datasets")


def fast_allocator() -> None:
    """Re-execute this bench on the allocator the CLI uses (tcmalloc when installed; see
    :mod:`chestxray.allocator`), so a bench run with the plain interpreter measures what users get."""
    from chestxray.allocator import ensure_allocator

    ensure_allocator()


def machine() -> dict[str, Any]:
    """CPU, core count, load, allocator and library versions, recorded beside every figure."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
                            "python": platform.python_version(), "machine": platform.machine()}
    from chestxray.allocator import active_allocator

    info["allocator"] = active_allocator()
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.cuda.is_available(), torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def save_result(kind: str, record: dict[str, Any]) -> Path:
    """Write ``record`` plus machine facts as ``bench/results/<kind>-<date>-<time>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{kind}-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps({"kind": kind, "date": datetime.now().isoformat(timespec="seconds"),
                                "machine": machine(), **record}, indent=2, default=str) + "\n")
    return path


def add_training_flags(parser: Any) -> None:
    """One ``--flag`` per ``TrainConfig`` option on an argparse ``parser`` (``--flag/--no-flag`` for
    booleans), left ``None`` when not given; :func:`training_overrides` collects the ones given."""
    import argparse

    from chestxray.training.config import TrainConfig, declared_options

    group = parser.add_argument_group("training options (as `chestxray train`)")
    for name, default, meta in declared_options(TrainConfig):
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
        else:
            group.add_argument(flag, dest=name, default=None, help=f"{meta['help']} (default: {default})")


def training_overrides(args: Any) -> dict[str, Any]:
    """The ``TrainConfig`` options given on the command line (see :func:`add_training_flags`), for
    ``load_config(path, **overrides)``, which checks and converts them."""
    from chestxray.training.config import TrainConfig, declared_options

    return {name: getattr(args, name) for name, _, _ in declared_options(TrainConfig) if getattr(args, name) is not None}
