"""The Ray Data pipeline: read → validate + tokenize (actor pool) → quarantine → train / eval datasets.

Every source becomes a Dataset of `{"row", "raw"}` (the row as JSON text, or an undecodable line);
one actor stage holding the tokenizer turns each row into token ids or into a quarantine entry with
its reason. Bad rows are written to the quarantine file on the driver (their number is bounded by
`max_bad_fraction` or the run stops). `row` is the line index for JSON lines; Parquet and Hugging
Face sources are read in parallel blocks without a global index, so `row` is the row's id there
(null without one) and `raw` always holds the row itself.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import ray
from ray.data.expressions import col

from raydpo.config import DataConfig, ModelConfig, RunConfig
from raydpo.data.readers import detect_format, iter_rows
from raydpo.data.schema import BadRow
from raydpo.data.tokenize import tokenize_pair, tokenize_text
from raydpo.data.validate import Quarantine, QuarantineReport, canonicalize, chat_renderer, check_bad_fraction
from raydpo.errors import DataError
from raydpo.models.loading import load_tokenizer

PAIR_COLUMNS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def _split_lines(item: dict) -> list[dict]:
    """One JSON-lines file (bytes) → one row per non-blank line, numbered like readers.iter_rows."""
    out, row = [], 0
    for line in item["bytes"].splitlines():
        if not line.strip():
            continue
        try:
            text, err = line.decode("utf-8"), ""
        except UnicodeDecodeError as e:
            text, err = line.decode("utf-8", errors="replace"), f"line {row + 1}: invalid UTF-8: {e.reason}"
        out.append({"row": row, "raw": text, "error": err})
        row += 1
    return out


def _rows_to_json(batch: dict) -> dict:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    raws = [json.dumps({k: _plain(batch[k][i]) for k in keys}, default=repr) for i in range(n)]
    return {"row": [-1] * n, "raw": raws, "error": [""] * n}


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
    """The raw rows of `source` as a Ray Dataset with columns row, raw, error."""
    fmt = detect_format(source, cfg.format)
    if fmt == "jsonl":
        ds = ray.data.read_binary_files(str(Path(source).resolve())).flat_map(_split_lines)
    elif fmt == "parquet":
        ds = ray.data.read_parquet(str(Path(source).resolve())).map_batches(
            _rows_to_json, batch_format="numpy"
        )
    else:  # builtin rows, or a Hugging Face dataset, go through the shared reader
        rows = [
            {"row": i, "raw": json.dumps(r, default=repr), "error": ""}
            for i, r in iter_rows(source, cfg.format, cfg.split)
            if not isinstance(r, BadRow)
        ]
        ds = ray.data.from_items(rows)
    return ds.limit(cfg.max_rows) if cfg.max_rows else ds


class PreparePairs:
    """Actor stage: JSON text → canonical record → token ids, or a quarantine entry."""

    model_cfg: dict = {}  # set by `preparer` on a subclass, so actors take no constructor arguments
    data_cfg: dict = {}
    texts: bool = False  # rows are SFT texts (or prompt + completion) rather than preference pairs

    def __init__(self):
        self.data = DataConfig.model_validate(self.data_cfg)
        self.tokenizer = load_tokenizer(ModelConfig.model_validate(self.model_cfg))
        self.render = chat_renderer(self.tokenizer) if self.tokenizer.chat_template else None

    def one(self, raw: str, error: str) -> dict:
        if error:
            raise BadRow("undecodable", error)
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadRow("undecodable", f"invalid JSON: {e}") from None
        if not isinstance(row, dict):
            raise BadRow("wrong_type", f"a row must be a JSON object, got {type(row).__name__}")
        if self.texts:
            return self.one_text(row)
        rec = canonicalize(row, self.data.columns, self.render)
        pair = tokenize_pair(rec, self.tokenizer, self.data.max_length, self.data.max_prompt_length)
        return {"id": rec.id, "prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids,
                "rejected_ids": pair.rejected_ids}  # fmt: skip

    def one_text(self, row: dict) -> dict:
        """An SFT row: {"text"} (trained on all of it) or {"prompt", "completion"} (on the completion)."""
        cols = self.data.columns
        if cols.text in row:
            prompt, completion = "", row[cols.text]
        else:
            prompt, completion = row.get(cols.prompt, ""), row.get(cols.completion)
        if completion is None:
            raise BadRow("missing_field", f"an SFT row needs '{cols.text}' or '{cols.completion}'")
        if not isinstance(completion, str) or not isinstance(prompt, str):
            raise BadRow("wrong_type", "SFT text, prompt and completion must be strings")
        if not completion.strip():
            raise BadRow("empty_text", "the text to train on is empty")
        pair = tokenize_text(
            prompt, completion, self.tokenizer, self.data.max_length, self.data.max_prompt_length
        )
        rid = row.get(cols.id)
        return {"id": None if rid is None else str(rid), "prompt_ids": pair.prompt_ids,
                "chosen_ids": pair.chosen_ids, "rejected_ids": pair.rejected_ids}  # fmt: skip

    def __call__(self, batch: dict) -> dict:
        cols: dict[str, list] = {k: [] for k in ["row", "ok", "reason", "detail", "raw", "id", *PAIR_COLUMNS]}
        for row, raw, error in zip(batch["row"], batch["raw"], batch["error"]):
            try:
                out, reason, detail = self.one(raw, error), "", ""
            except BadRow as e:
                out, reason, detail = {"id": None, **{c: [] for c in PAIR_COLUMNS}}, e.reason, e.detail
            cols["row"].append(int(row))
            cols["ok"].append(not reason)
            cols["reason"].append(reason)
            cols["detail"].append(detail)
            cols["raw"].append("" if not reason else raw)
            for k, v in out.items():
                cols[k].append(v)
        return cols


def preparer(cfg: RunConfig, texts: bool = False) -> type[PreparePairs]:
    """PreparePairs bound to this run's model and data configs."""
    attrs = {"model_cfg": cfg.model.model_dump(), "data_cfg": cfg.data.model_dump(), "texts": texts}
    return type("PreparePairs", (PreparePairs,), attrs)


def preflight(cfg: RunConfig, tokenizer, source: str) -> None:
    """Checks on the driver before any Ray work: the source exists and, if conversational, can be rendered."""
    for _, row in iter_rows(source, cfg.data.format, cfg.data.split, max_rows=1):
        if isinstance(row, dict) and any(isinstance(v, list) for v in row.values()):
            if not getattr(tokenizer, "chat_template", None):
                name = cfg.model.tokenizer or cfg.model.policy
                raise DataError(
                    f"{source}: the data is conversational (lists of messages) but the tokenizer of "
                    f"{name!r} has no chat template; use a chat model's tokenizer or set model.tokenizer"
                )


def _no_restarts() -> dict:
    return {"max_restarts": 0}


def prepare_dataset(
    cfg: RunConfig, source: str, quarantine_path: Path, concurrency: int = 1, texts: bool = False
):
    """Validated, tokenized pairs (or SFT texts) of `source` as a materialized Dataset, plus the
    quarantine report."""
    with warnings.catch_warnings():  # the only way to set max_restarts=0 until Ray 2.64 names it
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        ds = source_dataset(cfg.data, source).map_batches(
            preparer(cfg, texts),
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            batch_size=256,
            batch_format="numpy",
            ray_remote_args_fn=_no_restarts,  # a failing tokenizer actor fails the stage with its error
        )
    ds = ds.materialize()
    total = ds.count()
    bad = ds.filter(expr=col("ok") == False).take_all()  # noqa: E712 (an expression, not a comparison)
    with Quarantine(quarantine_path) as q:
        for r in sorted(bad, key=lambda r: r["row"]):
            raw = _raw(r["raw"])
            row = (
                r["row"]
                if r["row"] >= 0
                else (raw.get(cfg.data.columns.id) if isinstance(raw, dict) else None)
            )
            q.add(source, row, BadRow(r["reason"], r["detail"]), raw)
        path = q.close()
    report = QuarantineReport(
        source=source, total=total, kept=total - len(bad), counts=dict(q.counts), path=path
    )
    check_bad_fraction(report, cfg.data.max_bad_fraction)
    ok = col("ok") == True  # noqa: E712 (builds a Ray Data expression)
    good = ds.filter(expr=ok).select_columns(["id", *PAIR_COLUMNS]).materialize()
    return good, report


def _raw(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text
