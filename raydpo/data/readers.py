"""Readers: every preference source as one stream of `(row_index, row)` pairs.

`iter_rows` yields each row of a source in order, numbered from 0, as a dict, or as a `BadRow`
("undecodable" / "wrong_type") when the row cannot even be parsed. No row is skipped silently:
what cannot be read is yielded as a BadRow so that validation quarantines it. The one exception
is a blank line in a JSON-lines file, which is not a row at all (editors and `cat` leave them);
blank lines are not numbered, so row indices agree with the same data in parquet or HF form.

Sources (`fmt="auto"` picks one from the string):
- `builtin:tiny-prefs`             rows built in memory (`raydpo.data.builtin`), no download;
- `*.jsonl` / `*.json` (JSON lines) streamed: lines are iterated from the open binary file (never
                                    the whole file in memory), split by `jsonl_lines` and each decoded
                                    once by `decode_jsonl_line`; the Ray pipeline uses both too;
- `*.parquet`                       streamed by record batches with pyarrow;
- a `save_to_disk` directory        `datasets.load_from_disk` (a DatasetDict: pick `split`);
- `owner/name` (not a local path)   a Hugging Face hub dataset, `datasets.load_dataset`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from raydpo.data.builtin import tiny_prefs
from raydpo.data.schema import BadRow
from raydpo.errors import DataError

Row = dict[str, Any] | BadRow

BUILTINS = {"builtin:tiny-prefs": tiny_prefs}
FORMATS = ("auto", "jsonl", "parquet", "hf")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ACCEPTED = (
    "a .jsonl/.json (JSON lines) or .parquet file, a directory written by datasets' save_to_disk, "
    f"a Hugging Face hub name like 'owner/name', or one of: {', '.join(BUILTINS)}"
)
PARQUET_BATCH_ROWS = 1024  # rows per pyarrow record batch: bounded memory for any file size


class UnreadableRow(BadRow):
    """A BadRow that carries the raw text it came from, for the quarantine file's `raw` field."""

    def __init__(self, reason: str, detail: str, raw: str):
        super().__init__(reason, detail)
        self.raw = raw


def detect_format(source: str, fmt: str = "auto") -> str:
    """The reader for `source`: "builtin", "jsonl", "parquet" or "hf" (DataError if none fits)."""
    if fmt not in FORMATS:
        raise DataError(f"data format {fmt!r} is not one of: {', '.join(FORMATS)}")
    if source.startswith("builtin:"):
        if source not in BUILTINS:
            raise DataError(f"unknown built-in data source {source!r}; available: {', '.join(BUILTINS)}")
        return "builtin"
    if fmt != "auto":
        return fmt
    path = Path(source)
    if path.is_dir():
        if any((path / m).is_file() for m in HF_MARKERS):
            return "hf"
        raise DataError(
            f"data source {source!r} is a directory but not a saved HF dataset; expected {ACCEPTED}"
        )
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    if not path.exists() and _HUB_NAME.match(source):
        return "hf"
    if not path.exists():
        raise DataError(f"data source {source!r} does not exist; expected {ACCEPTED}")
    raise DataError(f"data source {source!r}: cannot tell its format from the name; expected {ACCEPTED}")


def iter_rows(
    source: str, fmt: str = "auto", split: str = "train", max_rows: int | None = None
) -> Iterator[tuple[int, Row]]:
    """Yield `(row_index, row)` for the first `max_rows` rows of `source` (all when None).

    `row` is a dict, or a BadRow when the row cannot be parsed. Whole-source problems (a missing
    file, an unreadable parquet file, an unknown split) raise DataError, at the call when they can
    be seen up front (so a bad source fails before any work), else during iteration.
    """
    kind = detect_format(source, fmt)
    if kind == "builtin":
        rows: Iterable[Row] = BUILTINS[source]()
    elif kind == "jsonl":
        rows = _jsonl_rows(_existing_file(source))
    elif kind == "parquet":
        rows = _parquet_rows(_existing_file(source))
    elif Path(source).is_dir():
        rows = _load_from_disk(source, split)
    else:
        rows = _load_from_hub(source, split)
    return _numbered(rows, max_rows)


def _numbered(rows: Iterable[Row], max_rows: int | None) -> Iterator[tuple[int, Row]]:
    for i, row in enumerate(rows):
        if max_rows is not None and i >= max_rows:
            break
        yield i, row


def check_source(source: str, fmt: str = "auto") -> None:
    """What can be checked of `source` without reading it or importing torch, Ray or datasets: a
    known format, and for a JSON-lines or Parquet source a file that exists (DataError otherwise)."""
    if detect_format(source, fmt) in ("jsonl", "parquet"):
        _existing_file(source)


def _existing_file(source: str) -> Path:
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data source {source!r} does not exist")
    return path


def _jsonl_rows(path: Path) -> Iterator[Row]:
    """One row per non-blank line, decoded by `decode_jsonl_line`. A stream: the open file is iterated
    line by line (buffered reads), so memory holds one line at a time, whatever the file's size."""
    with path.open("rb") as f:
        for line_no, line in jsonl_lines(f):
            yield decode_jsonl_line(line, line_no)


BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some editors put at the start of a file


def jsonl_lines(lines: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """`(line_no, line)` for each non-blank line of a JSON-lines file read as bytes (an open binary
    file, iterated lazily, or `io.BytesIO` of its bytes), numbered from 1 counting blank lines, as
    editors do. Lines end at b"\\n" only (not at \\r or Unicode line separators). A UTF-8 BOM
    before the first line is dropped. Blank lines are not rows (module docstring); the readers and
    the Ray pipeline both split here."""
    for line_no, line in enumerate(lines, start=1):
        if line_no == 1 and line.startswith(BOM):
            line = line[len(BOM) :]
        if line.strip():
            yield line_no, line


def decode_jsonl_line(line: bytes, line_no: int | None = None) -> Row:
    """One JSON-lines line → its row (a dict), or an UnreadableRow: "undecodable" for bad UTF-8,
    bad JSON, JSON nested too deeply or with an integer too long for Python, or a string holding a
    lone surrogate escape ("\\ud800": JSON syntax, but not Unicode text), "wrong_type" for JSON
    that is not an object. The one decoder of JSON lines: the reader above and the Ray pipeline
    (`raydpo.data.pipeline`) call it once per line. `line_no` prefixes the detail ("line 3: ...")
    when the line came from a file."""
    where = "" if line_no is None else f"line {line_no}: "
    line = line.rstrip(b"\r\n")  # so that a JSON error's position is on line 1 of this line
    raw = line.decode("utf-8", errors="replace")
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return UnreadableRow("undecodable", f"{where}invalid UTF-8: {e.reason}", raw)
    except ValueError as e:  # JSONDecodeError, or an integer over Python's int_max_str_digits
        return UnreadableRow("undecodable", f"{where}{e}", raw)
    except RecursionError:
        return UnreadableRow("undecodable", f"{where}JSON nested too deeply to read", raw)
    if _SURROGATE_ESCAPE.search(line):
        bad = _lone_surrogate(value)
        if bad is not None:
            return UnreadableRow(
                "undecodable", f"{where}invalid Unicode: a lone surrogate {bad!r} in a string", raw
            )
    if not isinstance(value, dict):
        return UnreadableRow("wrong_type", f"{where}a JSON {type(value).__name__}, not an object", raw)
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # only such lines can hold a lone surrogate
_SURROGATE = re.compile("[\ud800-\udfff]")  # a pair of escapes decodes to one character, not these


def _lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in any string (key or value) of a decoded JSON value, or None.
    Iterative, so that JSON nested as deeply as `json.loads` allows cannot overflow the stack."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            found = _SURROGATE.search(v)
            if found:
                return found.group()
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def _parquet_rows(path: Path) -> Iterator[Row]:
    """Rows as dicts, streamed one record batch at a time; the file is opened (and checked) now."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path.name}: not a readable parquet file: {_one_line(e)}") from e

    def rows() -> Iterator[Row]:
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path.name}: parquet file is corrupt: {_one_line(e)}") from e

    return rows()


def _load_from_disk(source: str, split: str) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(source)
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, arrow errors, ...
        raise DataError(f"{source!r}: not a readable saved HF dataset: {_one_line(e)}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source!r} has no split {split!r}; available splits: {', '.join(ds)}")
        ds = ds[split]
    return ds


def _load_from_hub(source: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown name, gated, unknown split: all one-line DataErrors
        raise DataError(
            f"could not load Hugging Face dataset {source!r} (split {split!r}): {_one_line(e)}"
        ) from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
