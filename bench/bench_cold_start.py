"""Cold start: wall time of whole `chestxray` commands, each a fresh process, as a user runs them.

Commands: ``chestxray --help``, ``chestxray --version`` and ``chestxray predict BUNDLE IMAGE`` (one
real X-ray) with the default backend, with ``--backend torch`` and, when the bundle has ``model.onnx``,
with ``--backend onnx``. Each is run
``--repeats`` times after one untimed run (so the files are in the page cache, as on a machine that has
run the tool before); the median and the range are reported. The allocator re-execution is part of
the time. ``--src`` measures another checkout's ``src/`` with this Python (e.g. the code before a change).

    .venv/bin/python bench/bench_cold_start.py BUNDLE [--image X.png] [--repeats 5] [--src OTHER/src]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATA, save_result  # noqa: E402


def timed(command: list[str], env: dict[str, str], repeats: int) -> dict[str, float]:
    """Median, min and max wall seconds of ``command`` over ``repeats`` runs (after one untimed run)."""
    subprocess.run(command, env=env, capture_output=True, check=True)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, env=env, capture_output=True, check=True)
        seconds.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--image", type=Path,
                        default=DATA / "chest_xray_4class" / "test" / "normal" /
                        sorted(os.listdir(DATA / "chest_xray_4class" / "test" / "normal"))[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--src", type=Path, help="another checkout's src/ to measure instead of the installed one")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.src.resolve()), env.get("PYTHONPATH", "")]))
    cli = [sys.executable, "-m", "chestxray.cli"]
    predict = [*cli, "predict", str(args.bundle), str(args.image)]
    commands = {"--help": [*cli, "--help"], "--version": [*cli, "--version"],
                "predict one image (default backend)": predict,
                "predict one image (--backend torch)": [*predict, "--backend", "torch"]}
    if (args.bundle / "model.onnx").is_file():
        commands["predict one image (--backend onnx)"] = [*predict, "--backend", "onnx"]
    results = {}
    for name, command in commands.items():
        try:
            results[name] = timed(command, env, args.repeats)
        except subprocess.CalledProcessError as err:  # e.g. --version in code that predates it
            results[name] = {"error": (err.stderr or b"").decode(errors="replace").strip().splitlines()[-1:]}
        print(f"{name}: {results[name]}", flush=True)
    record = {"bundle": str(args.bundle), "image": str(args.image), "repeats": args.repeats,
              "src": str(args.src) if args.src else "installed", "results": results}
    print(f"result: {save_result('cold-start', record)}")


if __name__ == "__main__":
    main()
