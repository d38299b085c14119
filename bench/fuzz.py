"""Long mode of the fuzzing harness (tests/fuzzing.py): many mutated real PNG, JPEG, TIFF and DICOM
files through ``decode.load_image`` and/or ``POST /v1/predict`` (in-process app, tiny model); and the
other paths that read bytes (``bench/fuzz_paths.py``): worklists naming hostile paths (``/dev/zero``,
FIFOs, sparse huge files, junk) and mutated files, and mutated WADO-RS answers from a loopback server.

    PYTHONPATH=src python bench/fuzz.py --target decode --cases 50000 --seed 1
    PYTHONPATH=src python bench/fuzz.py --target worklist --cases 200 --chunk 50
    PYTHONPATH=src python bench/fuzz.py --target dicomweb --cases 500 --chunk 100

Runs hypothesis in chunks of ``--chunk`` cases, each with its own seed (``--seed`` + chunk number),
so a long run is reproducible chunk by chunk. Fails (exit 1) on any exception other than the
project's ``InputError`` and on any 5xx; the failing inputs are written to ``--failures`` (outside
the repository: they are derived from the datasets' images). Writes counts, outcomes and timing
to ``bench/results/fuzz-<target>-<date>.json`` (with this process's peak RSS: the hostile paths must not
be read whole).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import save_result  # noqa: E402
from fuzz_paths import DicomwebTarget, WorklistTarget, dicomweb_answers, worklist_rows  # noqa: E402
from fuzzing import CONTENT_TYPES, Case, check_decode, check_predict, load_seeds, mutated  # noqa: E402
from hostile import peak_rss_mb  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def run(target: str, cases: int, chunk: int, first_seed: int, failures_dir: Path) -> dict:
    seeds = load_seeds()
    outcomes: collections.Counter[str] = collections.Counter()
    failures: list[dict] = []
    slowest = (0.0, "")
    client = _client() if target == "predict" else None
    paths = {"worklist": (WorklistTarget, worklist_rows), "dicomweb": (DicomwebTarget, dicomweb_answers)}
    checker = paths[target][0](_predictor()) if target in paths else None
    strategy = paths[target][1](seeds) if target in paths else mutated(seeds)
    rss_before = peak_rss_mb()  # the model and libraries loaded, before any case

    def one(case: Case, content_type: str) -> None:
        nonlocal slowest
        start = time.perf_counter()
        try:
            if checker is not None:
                outcome = checker.check(case)
            else:
                outcome = check_decode(case) if client is None else str(check_predict(client, case, content_type))
        except BaseException:
            outcomes["failed"] += 1
            raise
        elapsed = time.perf_counter() - start
        if elapsed > slowest[0]:
            slowest = (elapsed, getattr(case, "seed", repr(case)[:120]))
        outcomes[outcome] += 1

    start = time.perf_counter()
    done = 0
    number = 0
    while done < cases:
        size = min(chunk, cases - done)
        chunk_seed = first_seed + number
        before = sum(outcomes.values())

        @seed(chunk_seed)
        @settings(max_examples=size, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy, content_type=st.sampled_from(CONTENT_TYPES))
        def chunk_test(case: Case, content_type: str) -> None:
            one(case, content_type)

        try:
            chunk_test()
        except Exception as err:  # a finding: keep the shrunk input and go on with the next chunk
            failures.append(_record_failure(err, chunk_seed, failures_dir, len(failures)))
        done += sum(outcomes.values()) - before
        number += 1
        print(f"{done} cases ({dict(outcomes)}), {time.perf_counter() - start:.0f}s", flush=True)
    return {"target": target, "cases": done, "outcomes": dict(outcomes), "failures": failures,
            "chunks": number, "first_seed": first_seed, "chunk": chunk, "n_seed_files": len(seeds),
            "seconds": round(time.perf_counter() - start, 1),
            "slowest_case_s": round(slowest[0], 3), "slowest_case_seed": slowest[1],
            "peak_rss_mb_before_cases": rss_before, "peak_rss_mb": peak_rss_mb()}


def _record_failure(err: Exception, chunk_seed: int, directory: Path, index: int) -> dict:
    directory.mkdir(parents=True, exist_ok=True)
    falsifying = getattr(err, "__notes__", [])
    path = directory / f"failure-{chunk_seed}-{index}.txt"
    path.write_text("".join(traceback.format_exception(err)) + "\n".join(falsifying))
    print(f"FAILURE in chunk seed {chunk_seed}: {type(err).__name__}: {err} -> {path}", flush=True)
    return {"chunk_seed": chunk_seed, "error": f"{type(err).__name__}: {err}"[:500], "details": str(path)}


def _predictor():
    from factories import make_bundle

    from chestxray.inference.predict import load_model

    return load_model(make_bundle(Path(tempfile.mkdtemp(prefix="fuzz-bundle-"))), backend="torch")


def _client():
    from factories import make_bundle
    from fastapi.testclient import TestClient

    from chestxray.inference.predict import load_model
    from chestxray.serving.serve import create_app

    bundle = make_bundle(Path(tempfile.mkdtemp(prefix="fuzz-bundle-")))
    client = TestClient(create_app(load_model(bundle), api_key=""), raise_server_exceptions=False)
    client.__enter__()
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=("decode", "predict", "worklist", "dicomweb"), default="decode")
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first chunk (the next ones: +1, +2...).")
    parser.add_argument("--failures", type=Path, default=Path(tempfile.gettempdir()) / "chestxray-fuzz-failures")
    args = parser.parse_args()
    import warnings

    warnings.simplefilter("ignore")  # damaged files make pydicom and PIL warn on every other case
    record = run(args.target, args.cases, args.chunk, args.seed, args.failures)
    record["command"] = " ".join(sys.argv)
    path = save_result(f"fuzz-{args.target}", record)
    print(f"{record['cases']} cases, {len(record['failures'])} failure(s): {path}")
    sys.exit(1 if record["failures"] else 0)


if __name__ == "__main__":
    main()
