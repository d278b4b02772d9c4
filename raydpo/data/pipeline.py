"""The Ray Data pipeline: read → validate + tokenize (actor pool) → quarantine → train / eval datasets.

Every source becomes a Dataset of JSON lines, `{"row", "line", "data", "reason", "detail"}`: `data`
is the bytes of one JSON-lines line as read from the file (`line` its line number), or, for
Parquet, Hugging Face and built-in sources, the row encoded as JSON by this module (`line` 0).
`reason`/`detail` carry a row the reader could not read (then `data` is the JSON of the text it
came from). One actor stage holding the tokenizer decodes each line once, with the readers' own
decoder (`readers.decode_jsonl_line`), checks it with the same `validate.check_row` that
`raydpo data validate` uses, and turns it into token ids or into a quarantine entry with its reason.
The source's format (standard or conversational: `validate.first_format`, its first valid row) is
decided on the driver before the stage runs, so every actor quarantines a row of the other format
("mixed_format") exactly as `raydpo data validate` does.
Bad rows are written to the quarantine file on the driver (their number is bounded by
`max_bad_fraction` or the run stops). `row` is the row index for JSON lines and for Hugging Face
and built-in sources; Parquet is read in parallel blocks without a global index, so `row` is the
row's id there (null without one). A quarantine line's `raw` is what `raydpo data validate` writes.

A small JSON-lines source (`data.tokenize_workers: auto`: up to DRIVER_AUTO_BYTES, not streamed), or
a built-in one of up to PREPARE_BATCH rows, skips the actor pool: the driver runs the same stage on
the same items (`driver_items`) and hands Ray Data the same single block (`prepared_rows`), which
saves the seconds an actor needs to import torch and load the tokenizer.
Memory: the readers stream a JSON-lines file line by line, but here `read_binary_files` reads each
file whole into one block, which `_split_lines` then splits; a file must fit in one worker's memory.
Without streaming (`data.streaming`) the prepared rows are materialized in Ray's object store. With it
(`streams`), the stage writes them to parquet under the run directory as it goes (the driver never
holds more than the quarantined rows), and training reads that parquet back as a stream each epoch.
Hugging Face and built-in sources are read through the driver (`iter_rows`) either way.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.data.expressions import col

from raydpo.config import DataConfig, ModelConfig, RunConfig
from raydpo.data.readers import (
    BUILTINS,
    Row,
    UnreadableRow,
    decode_jsonl_line,
    detect_format,
    iter_rows,
    jsonl_lines,
)
from raydpo.data.schema import CONVERSATIONAL, BadRow, ChatRecord, TextRecord
from raydpo.data.tokenize import tokenize_pair, tokenize_text
from raydpo.data.validate import (
    NO_RENDERER,
    Quarantine,
    chat_renderer,
    check_bad_fraction,
    check_row,
    first_format,
    no_rows,
    quarantine_raw,
    report_of,
)
from raydpo.errors import DataError
from raydpo.models.loading import load_tokenizer

PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def _item(row: int, data: bytes, line: int = 0, reason: str = "", detail: str = "") -> dict:
    return {"row": row, "line": line, "data": data, "reason": reason, "detail": detail}


def _to_json(value: Any) -> bytes:
    return json.dumps(value, default=repr).encode()


def _split_lines(item: dict) -> list[dict]:
    """One JSON-lines file (bytes) → one item per non-blank line, undecoded, split and numbered
    as `readers.iter_rows` does (`readers.jsonl_lines`)."""
    lines = jsonl_lines(io.BytesIO(item["bytes"]))
    return [_item(row, line, line_no) for row, (line_no, line) in enumerate(lines)]


def _rows_to_json(batch: dict) -> dict:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    data = [_to_json({k: _plain(batch[k][i]) for k in keys}) for i in range(n)]
    return {"row": [-1] * n, "line": [0] * n, "data": data, "reason": [""] * n, "detail": [""] * n}


def _reader_items(rows: Iterable[tuple[int, Row]]) -> list[dict]:
    """A reader's rows (Hugging Face, built-in) as items; a row the reader could not read keeps
    its reason and detail, so that the actor stage quarantines it."""
    return [
        _item(i, _to_json(quarantine_raw(r)), reason=r.reason, detail=r.detail)
        if isinstance(r, BadRow)
        else _item(i, _to_json(r))
        for i, r in rows
    ]


def read_item(line: int, data: bytes, reason: str, detail: str) -> Row:
    """An item back into the reader's Row: the dict, or the BadRow, that `iter_rows` gives for it."""
    if reason:
        return UnreadableRow(reason, detail, json.loads(data))
    return decode_jsonl_line(data, int(line) or None)


def _plain(v: Any) -> Any:
    """numpy / arrow values → JSON-able Python values."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def source_dataset(cfg: DataConfig, source: str):
    """The rows of `source` as a Ray Dataset of items (columns row, line, data, reason, detail)."""
    fmt = detect_format(source, cfg.format)
    if fmt == "jsonl":
        ds = ray.data.read_binary_files(str(Path(source).resolve())).flat_map(_split_lines)
    elif fmt == "parquet":
        ds = ray.data.read_parquet(str(Path(source).resolve())).map_batches(
            _rows_to_json, batch_format="numpy"
        )
    else:  # builtin rows, or a Hugging Face dataset, go through the shared reader
        ds = ray.data.from_items(_reader_items(iter_rows(source, cfg.format, cfg.split, cfg.max_rows)))
    return ds.limit(cfg.max_rows) if cfg.max_rows else ds


class PreparePairs:
    """Actor stage: item → `check_row` → token ids, or a quarantine entry."""

    model_cfg: dict = {}  # set by `preparer` on a subclass, so actors take no constructor arguments
    data_cfg: dict = {}
    texts: bool = False  # rows are SFT texts (or prompt + completion) rather than preference pairs
    fmt: str | None = None  # the source's format (`validate.first_format`), decided on the driver

    def __init__(self):
        self.data = DataConfig.model_validate(self.data_cfg)
        self.tokenizer = load_tokenizer(ModelConfig.model_validate(self.model_cfg))
        self.render = chat_renderer(self.tokenizer) if self.tokenizer.chat_template else None

    def one(self, row: Row) -> dict:
        """One row → its token ids (BadRow when validation or tokenization rejects it)."""
        rec = check_row(row, self.data.columns, self.render, self.texts, self.fmt)
        if isinstance(rec, ChatRecord):  # `prepare_dataset` refuses this case on the driver first
            raise DataError(NO_RENDERER)
        d = self.data
        if isinstance(rec, TextRecord):
            pair = tokenize_text(
                rec.prompt, rec.completion, self.tokenizer, d.max_length, d.max_prompt_length
            )
        else:
            pair = tokenize_pair(rec, self.tokenizer, d.max_length, d.max_prompt_length)
        return {"id": rec.id, "prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids,
                "rejected_ids": pair.rejected_ids}  # fmt: skip

    def __call__(self, batch: dict) -> dict:
        cols: dict[str, list] = {k: [] for k in ["row", "ok", "reason", "detail", "raw", "id", *PAIR_COLUMNS]}
        items = zip(batch["row"], batch["line"], batch["data"], batch["reason"], batch["detail"])
        for index, line, data, reason, detail in items:
            row = read_item(line, data, reason, detail)
            try:
                out, reason, detail = self.one(row), "", ""
            except BadRow as e:
                out, reason, detail = {"id": None, **{c: [] for c in PAIR_COLUMNS}}, e.reason, e.detail
            cols["row"].append(int(index))
            cols["ok"].append(not reason)
            cols["reason"].append(reason)
            cols["detail"].append(detail)
            cols["raw"].append(json.dumps(quarantine_raw(row), default=repr) if reason else "")
            for k, v in out.items():
                cols[k].append(v)
        return cols


def preparer(cfg: RunConfig, texts: bool = False, fmt: str | None = None) -> type[PreparePairs]:
    """PreparePairs bound to this run's model and data configs and the source's format."""
    attrs = {"model_cfg": cfg.model.model_dump(), "data_cfg": cfg.data.model_dump(), "texts": texts,
             "fmt": fmt}  # fmt: skip
    return type("PreparePairs", (PreparePairs,), attrs)


STREAM_AUTO_BYTES = 1 << 30  # `data.streaming: auto` streams local sources larger than this
# `data.tokenize_workers: auto` prepares JSON-lines sources of up to this many bytes in the driver
DRIVER_AUTO_BYTES = 16 << 20


def source_bytes(source: str) -> int:
    """Bytes on disk of a local file or folder source (0 for hub names and builtin sources)."""
    path = Path(source)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def streams(cfg: RunConfig) -> bool:
    """Whether this run streams its pairs from parquet on disk (see the module docstring)."""
    d = cfg.data
    if d.streaming != "auto":
        return d.streaming == "on"
    return sum(source_bytes(s) for s in filter(None, [d.source, d.eval_source])) > STREAM_AUTO_BYTES


def tokenize_workers(cfg: RunConfig, streamed: bool) -> int:
    """Actors of the validate + tokenize stage; 0: the driver runs the stage's code itself. `auto`: the
    driver when every source is a JSON-lines file (together at most DRIVER_AUTO_BYTES) or a built-in
    set of at most PREPARE_BATCH rows, and the run does not stream (an actor that loads torch,
    transformers and the tokenizer takes seconds to start, longer than a small source takes to
    tokenize); else one actor. Only for such sources is the driver's Dataset the actor's, block for
    block (the actor makes one block of a small file, and one of a batch of built-in rows), which keeps
    order-dependent steps such as `train_test_split` the same."""
    d = cfg.data
    if d.tokenize_workers != "auto":
        return d.tokenize_workers
    sources = [s for s in (d.source, d.eval_source) if s]
    one_block = all(_one_block(d, s) for s in sources)
    small = sum(source_bytes(s) for s in sources) <= DRIVER_AUTO_BYTES
    return 0 if one_block and small and not streamed else 1


def _one_block(d: DataConfig, source: str) -> bool:
    """Whether the actor stage makes one block of `source`: a JSON-lines file (read whole, one task), or
    a built-in set that fits one batch of the stage (its rows, however Ray spreads them, join into it)."""
    if source.startswith("builtin:"):
        make = BUILTINS.get(source)
        rows = len(make()) if make else PREPARE_BATCH + 1  # an unknown name: the actor path's error
        return min(rows, d.max_rows or rows) <= PREPARE_BATCH
    return detect_format(source, d.format) == "jsonl"


PREFLIGHT_ROWS = 1000  # preflight reads at most this many rows (or one global batch) of a source


def global_batch(cfg: RunConfig) -> tuple[int, str]:
    """Rows in one global batch of training, and how that number comes about (for messages)."""
    b, w = cfg.train.batch_size, cfg.scaling.num_workers
    return b * w, f"train.batch_size={b} × scaling.num_workers={w}"


def _check_chat_template(cfg: RunConfig, tokenizer, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        name = cfg.model.tokenizer or cfg.model.policy
        raise DataError(
            f"{source}: the data is conversational (lists of messages) but the tokenizer of "
            f"{name!r} has no chat template; use a chat model's tokenizer (e.g. builtin:tiny-qwen) "
            "or set model.tokenizer"
        )


def preflight(cfg: RunConfig, tokenizer, source: str) -> None:
    """Checks on the driver before any Ray work, each a one-line DataError naming `source`: it exists
    and has rows; if conversational (its first valid row, among the first PREFLIGHT_ROWS), the
    tokenizer can render it; the training source (`data.source`) has rows for one global batch."""
    d = cfg.data
    need, how = global_batch(cfg) if source == d.source else (1, "")
    n, fmt = 0, None
    for i, row in iter_rows(source, d.format, d.split, d.max_rows):
        n += 1
        if fmt is None:
            fmt = first_format([(i, row)], d.columns)
        if n >= need and (fmt is not None or n >= PREFLIGHT_ROWS):
            break
    if n == 0:
        raise DataError(no_rows(source))
    if fmt == CONVERSATIONAL:
        _check_chat_template(cfg, tokenizer, source)
    if n < need:
        capped = f", data.max_rows={d.max_rows}" if d.max_rows and d.max_rows < need else ""
        raise DataError(
            f"{source}: {n} rows, fewer than one global batch of {need} ({how}{capped}); "
            "add rows or lower train.batch_size"
        )


def _no_restarts() -> dict:
    return {"max_restarts": 0}


def store_parquet(ds, folder: Path):
    """`ds` written to parquet in `folder` (replaced atomically), read back lazily: a stream."""
    tmp = folder.with_name(f"{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.write_parquet(str(tmp))
    old = folder.with_name(f"{folder.name}.old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return ray.data.read_parquet(str(folder))


def driver_items(cfg: DataConfig, source: str) -> Iterator[dict]:
    """`source_dataset`'s items, batch by batch, read in the driver: the same items in the same order
    (the same functions make them), without Ray tasks. Parquet is read by Ray's reader, whose numpy
    batches `_rows_to_json` is written for."""
    fmt = detect_format(source, cfg.format)
    if fmt == "jsonl":
        items = _split_lines({"bytes": Path(source).read_bytes()})
        batches = (_columns(items[i : i + PREPARE_BATCH]) for i in range(0, len(items), PREPARE_BATCH))
    elif fmt == "parquet":
        parquet = ray.data.read_parquet(str(Path(source).resolve()))
        batches = (
            _rows_to_json(b) for b in parquet.iter_batches(batch_size=PREPARE_BATCH, batch_format="numpy")
        )
    else:
        items = _reader_items(iter_rows(source, cfg.format, cfg.split, cfg.max_rows))
        batches = (_columns(items[i : i + PREPARE_BATCH]) for i in range(0, len(items), PREPARE_BATCH))
    left = cfg.max_rows
    for batch in batches:
        n = len(batch["row"])
        if left is not None:
            batch, n = {k: v[:left] for k, v in batch.items()}, min(n, left)
            left -= n
        if n:
            yield batch
        if left == 0:
            return


def _columns(items: list[dict]) -> dict[str, list]:
    return {k: [it[k] for it in items] for k in ("row", "line", "data", "reason", "detail")}


PREPARE_BATCH = 256  # rows per batch of the validate + tokenize stage


def prepared_rows(cfg: RunConfig, source: str, texts: bool, fmt: str | None, store: Path | None):
    """The validate + tokenize stage's output (columns row, ok, reason, detail, raw, id and the token
    ids): materialized, or with `store` written there and read back as a stream. With
    `tokenize_workers(cfg)` 0 the driver runs the stage itself into a materialized Dataset of one block
    (each batch converted as Ray converts the actor's, `BlockAccessor.batch_to_block`)."""
    workers = tokenize_workers(cfg, store is not None)
    stage = preparer(cfg, texts, fmt)
    if workers == 0:
        from ray.data.block import BlockAccessor

        prepare = stage()
        tables = [BlockAccessor.batch_to_block(prepare(b)) for b in driver_items(cfg.data, source)]
        tables = tables or [BlockAccessor.batch_to_block(prepare(_columns([])))]  # an empty source
        # One block, as the actor stage makes of one small file (Ray Data joins a task's outputs).
        ds = ray.data.from_arrow(pa.concat_tables(tables, promote_options="permissive"))
        return ds if store is None else store_parquet(ds, store)
    with warnings.catch_warnings():  # the only way to set max_restarts=0 until Ray 2.64 names it
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        ds = source_dataset(cfg.data, source).map_batches(
            stage,
            compute=ray.data.ActorPoolStrategy(size=workers),
            batch_size=PREPARE_BATCH,
            batch_format="numpy",
            ray_remote_args_fn=_no_restarts,  # a failing tokenizer actor fails the stage with its error
        )
    return ds.materialize() if store is None else store_parquet(ds, store)


def prepare_dataset(
    cfg: RunConfig, source: str, quarantine_path: Path, texts: bool = False, store: Path | None = None,
):  # fmt: skip
    """Validated, tokenized pairs (or SFT texts) of `source` as a Dataset, plus the quarantine report.
    The Dataset is materialized in the object store, or with `store` a stream over the parquet files
    written there. The training source (`data.source`) must keep rows for one global batch."""
    d = cfg.data
    fmt = None if texts else first_format(iter_rows(source, d.format, d.split, d.max_rows), d.columns)
    if fmt == CONVERSATIONAL:  # a one-line error here rather than a failed actor stage
        _check_chat_template(cfg, load_tokenizer(cfg.model), source)
    ds = prepared_rows(cfg, source, texts, fmt, store)
    total = ds.count()  # parquet: from the files' metadata
    bad = ds.filter(expr=col("ok") == False).take_all()  # noqa: E712 (an expression, not a comparison)
    with Quarantine(quarantine_path) as q:
        for r in sorted(bad, key=lambda r: r["row"]):
            raw = json.loads(r["raw"])
            row = (
                r["row"]
                if r["row"] >= 0
                else (raw.get(cfg.data.columns.id) if isinstance(raw, dict) else None)
            )
            q.add(source, row, BadRow(r["reason"], r["detail"]), raw)
        q.close()
    report = report_of(q, source, total, total - len(bad), fmt, rendered=True)
    check_bad_fraction(report, cfg.data.max_bad_fraction)
    need, how = global_batch(cfg)
    if source == cfg.data.source and report.kept < need:
        where = f"; {report.bad} quarantined, see {report.path}" if report.path else ""
        raise DataError(
            f"{source}: {report.kept} valid rows (of {report.total}{where}) do not fill one global "
            f"batch of {need} ({how}); add rows or lower train.batch_size"
        )
    ok = col("ok") == True  # noqa: E712 (builds a Ray Data expression)
    good = ds.filter(expr=ok).select_columns(["id", *PAIR_COLUMNS])
    return (good.materialize() if store is None else good), report


def _hash_part(table: pa.Table, fraction: float, seed: int, held_out: bool) -> pa.Table:
    """The rows of `table` whose hash of (seed, token ids) falls in the held-out share, or the others."""
    cols = [table.column(c).to_pylist() for c in PAIR_COLUMNS]
    keep = [
        (zlib.crc32(json.dumps([seed, p, c, r]).encode()) / 2**32 < fraction) == held_out
        for p, c, r in zip(*cols)
    ]
    return table.filter(pa.array(keep, type=pa.bool_()))


def hash_split(ds, fraction: float, seed: int):
    """(train, eval) of a streamed Dataset, both lazy: a pair is held out when a hash of (seed, its
    token ids) falls below `fraction`, so the split is the same on every pass and every run with
    that seed (not `train_test_split`'s exact share: about `fraction` of the rows)."""
    part = lambda held_out: ds.map_batches(_hash_part, batch_format="pyarrow", fn_kwargs={
        "fraction": fraction, "seed": seed, "held_out": held_out})  # fmt: skip
    return part(False), part(True)
