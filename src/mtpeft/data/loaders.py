"""Read record files (JSON, JSONL, CSV, TSV, parquet) into lists of dicts, with located errors.

Every error raised here is a :class:`DataFormatError` whose message names the file and, where the
format has lines, the line (and column) of the problem, so that a broken data file can be fixed
without a debugger.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataFormatError

__all__ = [
    "DataFormatError",
    "Record",
    "RECORD_SUFFIXES",
    "read_records",
    "read_located_records",
    "is_record_file",
]

#: File suffixes :func:`read_records` understands (lower case).
RECORD_SUFFIXES: tuple[str, ...] = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class Record:
    """One record of a data file and where it came from.

    ``line`` is the 1-based line where the record starts (for parquet files, Hugging Face datasets
    and generated data, the 1-based row number, with ``unit="row"``); ``index`` is its 0-based
    position among the source's records.
    """

    data: dict[str, Any]
    source: str
    line: int
    index: int
    unit: str = "line"

    def where(self) -> str:
        """Return ``"<source> line <n> (record <i>)"`` (or ``row <n>``) for error messages."""
        if self.unit == "row":
            return f"{self.source} row {self.line}"
        return f"{self.source} line {self.line} (record {self.index})"


def is_record_file(path: str | Path) -> bool:
    """Return True when ``path`` has a suffix :func:`read_records` can read."""
    return Path(path).suffix.lower() in RECORD_SUFFIXES


def read_records(
    path: str | Path,
    *,
    columns: Sequence[str] | None = None,
    header: bool | None = None,
    split: str | None = None,
) -> list[dict[str, Any]]:
    """Read a record file into a list of dicts.

    Formats, chosen by suffix:

    * ``.json``: a list of objects, or an object holding exactly one list of records (BBH's
      ``{"canary": ..., "examples": [...]}``), or an object with several lists keyed by split name
      (pick one with ``split``);
    * ``.jsonl``: one object per non-blank line;
    * ``.csv`` / ``.tsv``: a header row names the fields unless ``columns`` is given. ``header=None``
      means "the file has a header unless ``columns`` is given"; ``header=True`` with ``columns``
      skips the file's header and uses ``columns``. TSV is read with ``csv.QUOTE_NONE`` (GLUE TSVs
      contain unbalanced quotes), CSV with standard quoting. Every row must have as many fields as
      the header;
    * ``.parquet``: via pyarrow.

    Text files must be UTF-8 (a byte-order mark is accepted).

    Raises:
        FileNotFoundError: the file does not exist.
        DataFormatError: the file is empty, not UTF-8, or malformed; the message names file and line.
    """
    return [r.data for r in read_located_records(path, columns=columns, header=header, split=split)]


def read_located_records(
    path: str | Path,
    *,
    columns: Sequence[str] | None = None,
    header: bool | None = None,
    split: str | None = None,
) -> list[Record]:
    """Like :func:`read_records`, but each record carries its file, line and index (see :class:`Record`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.is_dir():
        raise DataFormatError(f"{path}: is a directory, expected a data file")
    suffix = path.suffix.lower()
    if suffix not in RECORD_SUFFIXES:
        raise DataFormatError(
            f"{path}: unsupported file type {suffix or '(no suffix)'!r}; "
            f"expected one of {list(RECORD_SUFFIXES)}"
        )
    if suffix == ".parquet":
        return _read_parquet(path)
    text = _read_text(path)
    if suffix == ".json":
        return _read_json(path, text, split)
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    return _read_delimited(path, text, "\t" if suffix == ".tsv" else ",", columns, header)


# ----------------------------------------------------------------------------------------- helpers


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataFormatError(f"{path}: file is empty")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = raw[exc.start : exc.end]
        raise DataFormatError(
            f"{path} line {line} column {col}: not valid UTF-8 (byte {bad!r}: {exc.reason}); "
            "re-encode the file as UTF-8"
        ) from None


class _LineIndex:
    """Maps character offsets of a text to 1-based (line, column)."""

    def __init__(self, text: str) -> None:
        self._starts = [0]
        pos = text.find("\n")
        while pos != -1:
            self._starts.append(pos + 1)
            pos = text.find("\n", pos + 1)

    def locate(self, offset: int) -> tuple[int, int]:
        i = bisect.bisect_right(self._starts, offset) - 1
        return i + 1, offset - self._starts[i] + 1


_WS = " \t\n\r"


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WS:
        pos += 1
    return pos


def _json_error(path: Path, exc: json.JSONDecodeError, what: str = "invalid JSON") -> DataFormatError:
    return DataFormatError(f"{path} line {exc.lineno} column {exc.colno}: {what}: {exc.msg}")


def _read_json(path: Path, text: str, split: str | None) -> list[Record]:
    # Parse the whole document first: that gives exact line/column errors for any syntax problem.
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _json_error(path, exc) from None
    except RecursionError:
        raise DataFormatError(f"{path}: JSON nested too deeply to read") from None
    lines = _LineIndex(text)
    decoder = json.JSONDecoder()
    start = _skip_ws(text, 0)
    if isinstance(doc, list):
        return _located_array(path, text, start, doc, lines, decoder)
    if not isinstance(doc, dict):
        raise DataFormatError(
            f"{path}: top-level JSON value is a {type(doc).__name__}; expected a list of records "
            "or an object holding one"
        )
    list_keys = [k for k, v in doc.items() if isinstance(v, list)]
    if not list_keys:
        raise DataFormatError(
            f"{path}: top-level JSON object has no list of records (keys: {sorted(doc)}); "
            'expected a list or an object such as {"examples": [...]}'
        )
    if split is not None and split in list_keys:
        key = split
    elif len(list_keys) == 1:
        key = list_keys[0]
    else:
        raise DataFormatError(
            f"{path}: top-level JSON object holds several lists {list_keys}; "
            f"name the one to read with split=... (got split={split!r})"
        )
    # Walk the object to find where the chosen list starts, so records get their real lines. A repeated
    # key's last value is the one json.loads kept.
    pos, found = start + 1, start
    while True:
        pos = _skip_ws(text, pos)
        k, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos) + 1  # the ':'
        pos = _skip_ws(text, pos)
        if k == key:
            found = pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos)
        if text[pos] == "}":
            return _located_array(path, text, found, doc[key], lines, decoder)
        pos += 1  # ','


def _located_array(
    path: Path, text: str, pos: int, values: list[Any], lines: _LineIndex, decoder: json.JSONDecoder
) -> list[Record]:
    out: list[Record] = []
    pos += 1  # '['
    for i, value in enumerate(values):
        pos = _skip_ws(text, pos)
        line, col = lines.locate(pos)
        if not isinstance(value, dict):
            raise DataFormatError(
                f"{path} line {line} column {col}: record {i} is a JSON {type(value).__name__}, "
                "expected an object"
            )
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip_ws(text, pos) + 1  # ','
        out.append(Record(value, str(path), line, i))
    return out


def _read_jsonl(path: Path, text: str) -> list[Record]:
    out: list[Record] = []
    # Lines end at "\n" only: JSON strings may hold other line separators (U+2028, U+0085) unescaped.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                f"{path} line {lineno} column {exc.colno}: invalid JSON: {exc.msg}"
            ) from None
        except RecursionError:
            raise DataFormatError(f"{path} line {lineno}: JSON nested too deeply to read") from None
        if not isinstance(value, dict):
            raise DataFormatError(
                f"{path} line {lineno}: expected a JSON object per line, got a {type(value).__name__}"
            )
        out.append(Record(value, str(path), lineno, len(out)))
    return out


def _read_delimited(
    path: Path, text: str, delimiter: str, columns: Sequence[str] | None, header: bool | None
) -> list[Record]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    kind = "tab" if delimiter == "\t" else "comma"
    # Rows end at \n, \r\n or \r only (as csv expects), not at the other separators str.splitlines knows.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    header_pending = header if header is not None else columns is None
    names: list[str] | None = list(columns) if columns is not None else None
    if names is not None and len(set(names)) != len(names):
        raise DataFormatError(f"{path}: duplicate names in columns={names}")
    out: list[Record] = []
    prev_line = 0
    try:
        for row in reader:
            start_line = prev_line + 1
            prev_line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header_pending:
                header_pending = False
                if names is None:
                    names = [c.strip() for c in row]
                    if len(set(names)) != len(names):
                        raise DataFormatError(
                            f"{path} line {start_line}: duplicate column names in header {names}"
                        )
                continue
            assert names is not None  # set from columns or from the header row
            if len(row) != len(names):
                raise DataFormatError(
                    f"{path} line {start_line}: expected {len(names)} {kind}-separated fields {names}, "
                    f"got {len(row)}"
                )
            out.append(Record(dict(zip(names, row)), str(path), start_line, len(out)))
    except csv.Error as exc:
        raise DataFormatError(
            f"{path} line {reader.line_num}: malformed {path.suffix[1:].upper()}: {exc}"
        ) from None
    return out


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow comes with datasets
        raise DataFormatError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from exc
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataFormatError(f"{path}: cannot read parquet file: {exc}") from None
    return [Record(row, str(path), i + 1, i, "row") for i, row in enumerate(table.to_pylist())]
