"""The ``worklist`` and ``dicomweb`` targets of ``bench/fuzz.py``: the other paths that read bytes.

- ``worklist``: a worklist of 1 to 6 rows drawn from hostile paths (``/dev/zero``, a FIFO nobody writes
  to, a sparse file over the size limit, a folder, junk, an empty or missing file; ``tests/hostile.py``)
  and mutated real X-ray files, sometimes with a row repeated, scored by ``score_worklist``: it must
  return and write one results row per distinct entry, every unreadable row marked with a one-line error;
- ``dicomweb``: a loopback DICOMweb server answering a WADO-RS request with a mutated multipart answer
  (mutated DICOM parts, wrong part types, a missing or wrong boundary, HTML, a truncated body): the
  study's assessment is a :class:`ChestXrayError` in one line or a result whose failed parts are one line.

Either fails on anything else (another exception, a traceback in a message, a missing results row).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fuzzing import Case, Seed, mutated
from hostile import BOUNDARY, hostile_files, http_server
from hypothesis import strategies as st

HOSTILE_KINDS = ("dev_zero", "fifo", "sparse", "folder", "junk", "empty", "missing")
FORMS = ("multipart", "html", "no boundary", "other boundary", "json part", "truncated", "no closing delimiter")


@st.composite
def worklist_rows(draw, seeds: list[Seed]) -> list:
    rows = draw(st.lists(st.one_of(st.sampled_from(HOSTILE_KINDS), mutated(seeds)), min_size=1, max_size=6))
    if draw(st.booleans()):
        rows.append(rows[0])  # a repeated row is scored once
    return rows


@st.composite
def dicomweb_answers(draw, seeds: list[Seed]) -> tuple[str, bytes]:
    """``(content type, body)`` of a mutated WADO-RS answer."""
    dicom = [s for s in seeds if s.name.endswith(".dcm")]
    parts = [draw(mutated(dicom)).data for _ in range(draw(st.integers(1, 3)))]
    form = draw(st.sampled_from(FORMS))
    kind = "application/json" if form == "json part" else "application/dicom"
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {kind}\r\n\r\n".encode() + p + b"\r\n" for p in parts)
    if form != "no closing delimiter":
        body += f"--{BOUNDARY}--\r\n".encode()
    content_type = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
    if form == "html":
        content_type, body = "text/html", b"<html><body>Please log in</body></html>"
    elif form == "no boundary":
        content_type = 'multipart/related; type="application/dicom"'
    elif form == "other boundary":
        content_type = content_type.replace(BOUNDARY, "another")
    elif form == "truncated":
        body = body[:draw(st.integers(0, max(0, len(body) - 1)))]
    return content_type, body


class WorklistTarget:
    """Scores each drawn worklist with a tiny model; :meth:`check` returns the case's outcome."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.folder = Path(tempfile.mkdtemp(prefix="fuzz-worklist-"))
        self.hostile = hostile_files(self.folder / "hostile")
        self.number = 0

    def check(self, rows: list) -> str:
        import pandas as pd

        from chestxray.worklist import score_worklist

        self.number += 1
        case_dir = self.folder / f"case{self.number}"
        case_dir.mkdir()
        paths = []
        for i, row in enumerate(rows):
            if isinstance(row, Case):
                path = case_dir / f"{i}_{row.name}"
                path.write_bytes(row.data)
                paths.append(str(path))
            else:
                paths.append(self.hostile[row])
        (case_dir / "list.csv").write_text("path\n" + "".join(f"{p}\n" for p in paths))
        result = score_worklist(self.predictor, case_dir / "list.csv", case_dir / "out.csv")
        table = pd.read_csv(case_dir / "out.csv", dtype=str, keep_default_na=False)
        keys = set(table["worklist_key"])
        assert keys == {f"path:{p}" for p in paths}, (sorted(keys), paths)
        assert result.entries == len(rows) and result.duplicates == len(paths) - len(set(paths)), result
        errors = dict(zip(table["worklist_key"], table["error"]))
        for row, path in zip(rows, paths):
            if not isinstance(row, Case):
                assert errors[f"path:{path}"], (row, path)  # every hostile path is a failed row
        for error in table["error"]:
            assert "\n" not in error and "Traceback" not in error, error
        for path in case_dir.iterdir():
            path.unlink()
        case_dir.rmdir()
        return "all failed" if all(table["error"]) else "some scored"


class DicomwebTarget:
    """One loopback server answering every WADO-RS request with the case at hand."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.current = ("text/plain", b"")
        self._server = http_server(self._answer)
        self.url = self._server.__enter__()

    def _answer(self, conn) -> None:
        content_type, body = self.current
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)

    def check(self, answer: tuple[str, bytes]) -> str:
        import chestxray.dicomweb as dicomweb
        from chestxray.errors import ChestXrayError

        self.current = answer
        try:
            result = dicomweb.assess_study(self.predictor, dicomweb.client(self.url, timeout=10), "1.2.3")
        except ChestXrayError as err:
            assert "\n" not in str(err) and str(err), repr(err)
            return "study refused"
        for label, reason in result.failed + result.skipped:
            assert reason and "\n" not in reason, (label, reason)
        return "assessed" if result.assessments else "parts failed or skipped"
