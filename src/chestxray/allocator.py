"""The memory allocator every chestxray process runs on.

glibc's malloc returns large blocks (activations of tens of MB) to the kernel on free and faults them
in again, zero-filled, on the next training step; in a virtual machine that costs a third of the CPU.
tcmalloc keeps them. The CLI puts itself on tcmalloc before it imports anything heavy, by re-executing
with ``LD_PRELOAD`` (as Intel's PyTorch launcher does); torchrun ranks, serve workers and cv/sweep runs
inherit it. ``CHESTXRAY_ALLOCATOR`` chooses:

- unset or ``tcmalloc``: use tcmalloc when the library is installed; otherwise say so once and go on;
- ``system``: the C library's malloc, no re-execution;
- a path to a shared library (``/usr/lib/.../libjemalloc.so.2``): preload that one.

A Python (notebook) user gets the same by starting Python with the library preloaded::

    LD_PRELOAD="$(python -m chestxray.allocator)" python train.py

This module imports nothing beyond the standard library: it runs before torch is loaded.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

__all__ = ["ENV", "active_allocator", "command_allocator", "ensure_allocator", "find_library", "system_allocator_note"]

ENV = "CHESTXRAY_ALLOCATOR"
_REEXEC = "CHESTXRAY_ALLOCATOR_REEXEC"  # set on the re-executed process: never loop
_WARNED = "CHESTXRAY_ALLOCATOR_WARNED"  # children (torchrun ranks, workers) do not repeat the warning
TCMALLOC = "libtcmalloc_minimal.so.4"
_SEARCH = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
           "/opt/homebrew/lib")
_KNOWN = ("tcmalloc", "jemalloc", "mimalloc")


def find_library(choice: str | None = None) -> Path | None:
    """The shared library ``choice`` (``$CHESTXRAY_ALLOCATOR``) names, or None when it is absent.

    ``tcmalloc`` (the default) is looked for in the usual library folders and the linker's cache.
    """
    choice = os.environ.get(ENV, "tcmalloc") if choice is None else choice
    if choice == "system":
        return None
    if choice != "tcmalloc":
        path = Path(choice).expanduser()
        return path if path.is_file() else None
    for folder in _SEARCH:
        path = Path(folder) / TCMALLOC
        if path.is_file():
            return path
    found = ctypes.util.find_library("tcmalloc_minimal")  # a name from the linker cache, e.g. on other distros
    return Path(found) if found and Path(found).is_absolute() else None


def active_allocator() -> str:
    """The allocator this process runs on: ``tcmalloc``, ``jemalloc``, ``mimalloc`` or ``system``."""
    loaded = _mapped_libraries()
    return next((name for name in _KNOWN if any(lib.startswith(f"lib{name}") for lib in loaded)), "system")


def command_allocator() -> str:
    """The allocator a chestxray command runs on with this environment: the library's name when
    :func:`ensure_allocator` would load it (or it is loaded), else ``system``."""
    if os.environ.get(ENV, "tcmalloc") == "system":
        return active_allocator()
    library = find_library()
    return library.name.split(".so")[0].removeprefix("lib").split("_")[0] if library else active_allocator()


def system_allocator_note() -> str | None:
    """The one line a Python process (a notebook, a script calling ``fit``) gets when it runs on the
    system allocator without having chosen it: how to start it on tcmalloc. None when it runs on
    another allocator, when ``$CHESTXRAY_ALLOCATOR`` is ``system``, or when the command line already
    said the library is missing (the ``chestxray`` commands re-execute themselves and never need it)."""
    if active_allocator() != "system" or os.environ.get(ENV, "tcmalloc") == "system" or os.environ.get(_WARNED):
        return None
    library = find_library()
    how = (f"start Python with LD_PRELOAD={library} (a notebook: LD_PRELOAD=\"$(python -m chestxray.allocator)\" "
           "jupyter lab)" if library else
           "install libtcmalloc-minimal4 (Debian/Ubuntu) and start Python with it in LD_PRELOAD")
    return (f"note: this Python runs on the system allocator, which trains slower than tcmalloc: {how}; "
            f"{ENV}=system silences this")


def ensure_allocator(argv: list[str] | None = None, *, execv=os.execve) -> str:
    """Re-execute this process on the chosen allocator unless it already runs on it; return its name.

    ``argv`` is the command line to run again (default ``sys.orig_argv``, which keeps ``-m module``).
    Returns without re-executing when ``$CHESTXRAY_ALLOCATOR`` is ``system``, when the library is
    already loaded, when this process was itself re-executed, or when the library is missing (one
    warning on stderr for the whole process tree).
    """
    choice = os.environ.get(ENV, "tcmalloc")
    current = active_allocator()
    if os.environ.pop(_REEXEC, None) or choice == "system":  # children start afresh, on the inherited LD_PRELOAD
        return current
    library = find_library(choice)
    if library is None:
        if not os.environ.get(_WARNED):
            wanted = TCMALLOC if choice == "tcmalloc" else choice
            hint = " (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)" if choice == "tcmalloc" else ""
            print(f"warning: allocator {wanted} not found{hint}; running on the system allocator, which is "
                  f"slower for training; set {ENV}=system to silence this", file=sys.stderr)
            os.environ[_WARNED] = "1"
        return current
    if library.name.split(".so")[0] in _mapped_libraries():
        return current
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(filter(None, [str(library), env.get("LD_PRELOAD", "")]))
    env[_REEXEC] = "1"
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))  # no "large alloc" chatter
    command = list(argv if argv is not None else sys.orig_argv)
    sys.stdout.flush()
    sys.stderr.flush()
    execv(sys.executable, [sys.executable, *command[1:]], env)
    return current  # only reached when execv is a stand-in (tests)


def _mapped_libraries() -> set[str]:
    """Base names (``libtcmalloc_minimal``) of the shared libraries mapped into this process."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:  # not Linux
        return set()
    return {Path(line.split()[-1]).name.split(".so")[0] for line in lines if ".so" in line}


if __name__ == "__main__":  # `LD_PRELOAD="$(python -m chestxray.allocator)" python ...`
    found = find_library()
    if found is None:
        sys.exit(f"no allocator library found for {ENV}={os.environ.get(ENV, 'tcmalloc')}")
    print(found)
