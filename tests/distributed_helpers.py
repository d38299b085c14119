"""Helpers for test_launch.py that run in other processes (spawned: they must be importable)."""

from __future__ import annotations

import os
import time
from multiprocessing.synchronize import Barrier

import chestxray.data.cache as cache
from chestxray.data.sources import load_samples


def build_logged(folder: str, cache_dir: str, log: str, start: Barrier) -> None:
    """Build the 16 px cache of ``folder`` slowly, appending this process id to ``log`` if it decodes."""
    decode_all = cache._decode_all

    def logged(*args, **kwargs):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # the other process arrives while this one builds
        yield from decode_all(*args, **kwargs)

    cache._decode_all = logged
    start.wait()
    cache.build_cache(load_samples(folder), 16, cache_dir=cache_dir, workers=1, progress=False)

