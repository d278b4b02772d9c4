"""Validation: every row becomes a PreferenceRecord or a quarantine line with a reason.

`canonicalize` turns one row of any accepted shape (README.md, "Preference data") into text:
- standard:        prompt / chosen / rejected strings, kept as they are;
- conversational:  lists of {"role", "content"} messages, rendered with the tokenizer's chat
                   template; the response text is what prompt + response adds to the rendered
                   prompt (with its generation prompt), so prompt + chosen is exactly the chat text.
                   Without a chat template (`raydpo data validate` with no --tokenizer) only the
                   structure is checked (`check_pair`) and the row stays a ChatRecord of messages;
- implicit prompt: no prompt key in the row; the prompt is the shared prefix of chosen and
                   rejected (TRL's `extract_prompt` rule for strings, whole messages for lists).
A row that cannot become a record raises BadRow with a code from `schema.REASONS`.

One source holds one format: the first row whose structure is valid (`first_format`) decides
"standard" or "conversational", and a later row of the other format is quarantined as
"mixed_format". Both paths decide it alike: `validate_rows` as it streams (the rows before the
first valid one are bad for their own reasons whatever the format), the Ray pipeline up front.

`check_row` is the one check of a row, used by both paths: `validate_rows` / `validate_source`
(the CLI's `raydpo data validate`) and the Ray pipeline that training reads (`pipeline.py`, which
then tokenizes). It takes a reader's Row (a dict, or the BadRow of a row that could not be read)
and gives a PreferenceRecord (a ChatRecord without a renderer), or a TextRecord for SFT sources
(`texts=True`), or raises BadRow;
so a row is kept or quarantined, with the same reason and detail, on both paths.

`validate_rows` runs it over a reader's stream, writing every bad row to a `Quarantine` file, and
`check_bad_fraction` stops the run when too many rows were bad. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raydpo.config import ColumnsConfig, DataConfig
from raydpo.data.readers import Row, iter_rows
from raydpo.data.schema import CONVERSATIONAL, STANDARD, BadRow, ChatRecord, PreferenceRecord, TextRecord
from raydpo.errors import DataError

ChatRenderer = Callable[[list[dict], bool], str]
"""(messages, add_generation_prompt) -> text, e.g. the tokenizer's chat template."""

NO_RENDERER = (
    "this dataset is conversational (prompt/chosen/rejected are lists of role/content messages); "
    "rendering it to text needs a tokenizer with a chat template, and none was given"
)
UNRENDERED = "conversational rows: structure checked; rendering not checked (pass --tokenizer)"
RENDERED = "conversational rows: structure checked and rendered with the chat template"


def chat_renderer(tokenizer: Any) -> ChatRenderer:
    """A ChatRenderer from a HF tokenizer's chat template (DataError when it has none)."""
    if getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(
            f"conversational data needs a tokenizer with a chat template; {name!r} has none "
            "(set model.tokenizer to one with a chat template, or give prompt/chosen/rejected as strings)"
        )

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render


# ----------------------------------------------------------------------------- one row


def check_row(
    row: Row,
    columns: ColumnsConfig,
    render_chat: ChatRenderer | None = None,
    texts: bool = False,
    fmt: str | None = None,
) -> PreferenceRecord | ChatRecord | TextRecord:
    """The one per-row check of `raydpo data validate` and of training: a reader's Row → a
    PreferenceRecord (a ChatRecord for a conversational row when there is no `render_chat`), or a
    TextRecord when `texts`; else raises BadRow. A BadRow from the reader (an undecodable line, say)
    is raised as it is. `fmt`: the source's format (`first_format`), None while not yet known."""
    if isinstance(row, BadRow):
        raise row
    return text_record(row, columns) if texts else canonicalize(row, columns, render_chat, fmt)


def first_format(rows: Iterable[tuple[int, Row]], columns: ColumnsConfig) -> str | None:
    """The format of a preference source: that of its first row whose structure is valid
    (`check_pair`), STANDARD or CONVERSATIONAL; None when no row is. Reads only up to that row."""
    for _, row in rows:
        if isinstance(row, BadRow):
            continue
        try:
            pair = check_pair(row, columns)
        except BadRow:
            continue
        return CONVERSATIONAL if isinstance(pair, ChatRecord) else STANDARD
    return None


def quarantine_raw(row: Row) -> Any:
    """What a quarantine line keeps of a bad row: the row itself, or the text it was read from."""
    return getattr(row, "raw", None) if isinstance(row, BadRow) else row


def text_record(row: dict, columns: ColumnsConfig) -> TextRecord:
    """An SFT row: {text} (trained on all of it) or {prompt, completion} (on the completion)."""
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"row is a {type(row).__name__}, not an object")
    if columns.text in row:
        prompt, completion = "", row[columns.text]
    else:
        prompt, completion = row.get(columns.prompt, ""), row.get(columns.completion)
    if completion is None:
        if columns.text in row or columns.completion in row:
            name = columns.text if columns.text in row else columns.completion
            raise BadRow("missing_field", f"column {name!r} is null")
        wanted = f"{columns.text!r} or {columns.completion!r}"
        key = "completion" if columns.prompt in row else "text"  # {prompt, completion} or {text}
        raise BadRow("missing_field", _missing(row, wanted, key, {columns.prompt, columns.id}))
    if not isinstance(completion, str) or not isinstance(prompt, str):
        raise BadRow("wrong_type", "SFT text, prompt and completion must be strings")
    if not completion.strip():
        raise BadRow("empty_text", "the text to train on is empty")
    rid = row.get(columns.id)
    return TextRecord(prompt=prompt, completion=completion, id=None if rid is None else str(rid))


def canonicalize(
    row: dict, columns: ColumnsConfig, render_chat: ChatRenderer | None = None, fmt: str | None = None
) -> PreferenceRecord | ChatRecord:
    """One row → PreferenceRecord; raises BadRow(reason, detail). A conversational row is rendered
    with `render_chat`, or without one stays a ChatRecord (its structure checked, not its rendering)."""
    pair = check_pair(row, columns, fmt)
    if isinstance(pair, PreferenceRecord) or render_chat is None:
        return pair
    prompt, chosen, rejected = _render_pair(pair.prompt, pair.chosen, pair.rejected, render_chat)
    if chosen == rejected:
        raise BadRow("identical", "chosen and rejected render to the same text")
    return PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected, id=pair.id)


def check_pair(row: dict, columns: ColumnsConfig, fmt: str | None = None) -> PreferenceRecord | ChatRecord:
    """Every check of a preference row but rendering (and tokenization): a standard row becomes its
    PreferenceRecord, a conversational one a ChatRecord (implicit prompt split off); else BadRow.
    `fmt` (the source's format, if known): a row that passes every other check but is of the other
    format is "mixed_format" (a malformed one keeps the reason of its own problem)."""
    if not isinstance(row, dict):
        raise BadRow("wrong_type", f"row is a {type(row).__name__}, not an object")
    rid = row.get(columns.id)
    rid = None if rid is None else str(rid)
    chosen = _value(row, columns, "chosen")
    rejected = _value(row, columns, "rejected")
    implicit = columns.prompt not in row
    prompt = None if implicit else _value(row, columns, "prompt")
    values = {columns.chosen: chosen, columns.rejected: rejected}
    if not implicit:
        values = {columns.prompt: prompt, **values}
    _same_kind(values)
    kind = CONVERSATIONAL if isinstance(chosen, list) else STANDARD
    if kind == CONVERSATIONAL:
        for name, msgs in values.items():
            _check_messages(name, msgs, required=name != columns.prompt)
    else:
        for name, text in values.items():
            if not text.strip():
                raise BadRow("empty_text", f"{name!r} is empty or whitespace only")
    if chosen == rejected:
        raise BadRow("identical", f"{columns.chosen!r} and {columns.rejected!r} are identical")
    if implicit:
        prompt, chosen, rejected = _split_shared_prompt(chosen, rejected, columns)
    if kind == CONVERSATIONAL:  # the prompt/response split: a response is the assistant's turn
        for name, msgs in ((columns.chosen, chosen), (columns.rejected, rejected)):
            if msgs[0]["role"] != "assistant":
                raise BadRow(
                    "bad_message",
                    f"the {name!r} response starts with a {msgs[0]['role']!r} message, not 'assistant'",
                )
    if fmt is not None and kind != fmt:  # a valid row, but of the other format
        shape = "message lists" if kind == CONVERSATIONAL else "strings"
        raise BadRow(
            "mixed_format",
            f"a {kind} row (prompt/chosen/rejected as {shape}) in a {fmt} source; "
            "the source's first valid row decides its format",
        )
    if kind == CONVERSATIONAL:
        return ChatRecord(prompt=prompt, chosen=chosen, rejected=rejected, id=rid)
    return PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected, id=rid)


def _value(row: dict, columns: ColumnsConfig, key: str) -> str | list:
    """The value of column `columns.<key>`, a str or a list; missing_field / wrong_type otherwise."""
    name = getattr(columns, key)
    value = row.get(name)
    if value is None and name in row:
        raise BadRow("missing_field", f"column {name!r} is null")
    if value is None:
        taken = {columns.prompt, columns.chosen, columns.rejected, columns.id} - {name}
        raise BadRow("missing_field", _missing(row, repr(name), key, taken))
    if not isinstance(value, (str, list)):
        raise BadRow(
            "wrong_type", f"column {name!r} is a {type(value).__name__}, expected a str or a list of messages"
        )
    return value


MAX_LISTED = 8  # columns named in a missing_field detail


def _missing(row: dict, wanted: str, key: str, taken: set[str]) -> str:
    """The detail of a missing column: the row's columns and, when some of them hold text (or
    messages) and are not `taken` by another `data.columns` setting, the override to set:
    "missing 'chosen' (columns: question, good, bad); set data.columns.chosen=<name>"."""
    names = [str(k) for k in row]
    shown = ", ".join(names[:MAX_LISTED]) + (", ..." if len(names) > MAX_LISTED else "")
    detail = f"missing {wanted} ({f'columns: {shown}' if names else 'the row has no columns'})"
    if any(isinstance(v, (str, list)) and k not in taken for k, v in row.items()):
        detail += f"; set data.columns.{key}=<name>"
    return detail


def _same_kind(values: dict[str, str | list]) -> None:
    """All strings or all message lists: a mix has no meaning."""
    kinds = {name: "a list" if isinstance(v, list) else "a str" for name, v in values.items()}
    if len(set(kinds.values())) > 1:
        shown = ", ".join(f"{n!r} is {k}" for n, k in kinds.items())
        raise BadRow("wrong_type", f"columns mix strings and message lists: {shown}")


def _check_messages(name: str, msgs: list, required: bool) -> None:
    """Each message a dict with str role (not blank) and str content; a response must have some text."""
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise BadRow("bad_message", f"{name}[{i}] is a {type(m).__name__}, not a message object")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "missing" if m.get(key) is None else f"a {type(m[key]).__name__}"
                raise BadRow("bad_message", f"{name}[{i}]: {key!r} must be a str, got {got}")
        if not m["role"].strip():
            raise BadRow("bad_message", f"{name}[{i}]: 'role' is empty")
    if not msgs or (required and not any(m["content"].strip() for m in msgs)):
        raise BadRow("empty_text", f"{name!r} has no messages with text")


def _split_shared_prompt(chosen: Any, rejected: Any, columns: ColumnsConfig) -> tuple[Any, Any, Any]:
    """Implicit prompt: (prompt, chosen, rejected) from the shared prefix; no_shared_prompt if none.

    Strings follow TRL's `extract_prompt` (trl/data_utils.py): the longest common character
    prefix, moved back one character when the character before the divergence is a space, so
    the responses keep their leading space ("Q: hi A: yes" / "... no" → "Q: hi A:", " yes", " no").
    Message lists share whole messages.
    """
    n = 0
    limit = min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n < limit and n > 0 and chosen[n - 1] == " ":
        n -= 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    empty = (lambda x: not x.strip()) if isinstance(chosen, str) else (lambda x: not x)
    if empty(prompt) or empty(c) or empty(r):
        raise BadRow(
            "no_shared_prompt",
            f"no {columns.prompt!r} column, and {columns.chosen!r} and {columns.rejected!r} do not "
            f"split into a shared prompt and two non-empty responses (shared prefix: {prompt!r:.60})",
        )
    return prompt, c, r


def _render_pair(
    prompt: list[dict], chosen: list[dict], rejected: list[dict], render: ChatRenderer
) -> tuple[str, str, str]:
    """Chat texts: the prompt with its generation prompt, and what each response adds to it."""
    try:
        prompt_text = render(prompt, True)
        full = {"chosen": render(prompt + chosen, False), "rejected": render(prompt + rejected, False)}
    except DataError:
        raise
    except Exception as e:  # a template error for this row's messages (e.g. bad role order)
        raise BadRow("chat_template", f"the chat template failed: {type(e).__name__}: {e}") from e
    for name, text in full.items():
        if not text.startswith(prompt_text):
            raise BadRow(
                "chat_template",
                f"the chat template's rendering of prompt + {name} does not start with its rendering "
                "of the prompt (with the generation prompt), so the response cannot be cut out",
            )
    return prompt_text, full["chosen"][len(prompt_text) :], full["rejected"][len(prompt_text) :]


# ----------------------------------------------------------------------------- quarantine


@dataclass
class QuarantineReport:
    """What validation of one source kept and quarantined."""

    source: str
    total: int  # rows read (good and bad)
    kept: int  # rows that became records
    counts: dict[str, int] = field(default_factory=dict)  # quarantined rows per reason
    path: str | None = None  # the quarantine file; None when nothing was quarantined
    examples: dict[str, str] = field(default_factory=dict)  # per reason: its first row and detail
    format: str | None = None  # STANDARD or CONVERSATIONAL (`first_format`); None: unknown or SFT texts
    rendered: bool = False  # conversational rows were rendered with a chat template (else: structure only)

    @property
    def bad(self) -> int:
        return self.total - self.kept

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def summary(self) -> str:
        """Human-readable, several lines: totals, one line per reason, the quarantine file."""
        lines = [
            f"{self.source}: {self.total} rows, {self.kept} kept, {self.bad} quarantined "
            f"({100 * self.bad_fraction:.1f}%)"
        ]
        lines += [f"  {reason}: {n}" for reason, n in _by_count(self.counts)]
        if self.format == CONVERSATIONAL:
            lines.append(RENDERED if self.rendered else UNRENDERED)
        if self.path:
            lines.append(f"quarantined rows: {self.path}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "bad": self.bad, "bad_fraction": self.bad_fraction}


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


class Quarantine:
    """Bad rows as JSON lines `{"source", "row", "reason", "detail", "raw"}`, written atomically.

    Lines go to `<path>.tmp`; `close()` moves it to `path` with `os.replace`, so a reader never
    sees half a file. When no row was bad there is no file at all (a stale one from an earlier
    run is removed). Leaving a `with` block by an exception discards the partial file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}  # reason → "row N: detail" of the first row with it
        self._file = None
        self._closed = False

    def add(self, source: str, row: int, bad: BadRow, raw: Any) -> None:
        """Record one bad row; `raw` is the original row (or line text), repr'd if not JSON."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.tmp.open("w", encoding="utf-8")
        entry = {"source": source, "row": row, "reason": bad.reason, "detail": bad.detail, "raw": raw}
        try:
            line = json.dumps(entry, default=repr)
        except (TypeError, ValueError):  # non-str dict keys, circular references
            line = json.dumps({**entry, "raw": repr(raw)})
        self._file.write(line + "\n")
        self.counts[bad.reason] += 1
        where = "" if row is None else f"row {row}: "
        self.examples.setdefault(bad.reason, " ".join(f"{where}{bad.detail}".split()))

    def close(self) -> Path | None:
        """Publish the file (or remove a stale one); returns its path, or None if nothing was bad.
        Closing twice is harmless (a `with` block closes again on exit)."""
        if self._closed:
            return self.path if self.counts else None
        self._closed = True
        if self._file is None:
            self.path.unlink(missing_ok=True)
            return None
        self._file.close()
        self._file = None
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.discard() if exc_type is not None else self.close()


# ----------------------------------------------------------------------------- whole sources


def validate_rows(
    rows: Iterable[tuple[int, Row]],
    columns: ColumnsConfig,
    render_chat: ChatRenderer | None,
    quarantine: Quarantine,
    source: str,
    texts: bool = False,
) -> tuple[list[PreferenceRecord | ChatRecord | TextRecord], QuarantineReport]:
    """`check_row` on every row; bad ones go to `quarantine`, which this closes. The source's format
    is that of its first row with a valid structure (`first_format`, decided here as rows stream)."""
    records: list[PreferenceRecord | ChatRecord | TextRecord] = []
    total = 0
    fmt = None
    with quarantine:
        for index, row in rows:
            total += 1
            if fmt is None and not texts:
                fmt = first_format([(index, row)], columns)
            try:
                records.append(check_row(row, columns, render_chat, texts, fmt))
            except BadRow as bad:
                quarantine.add(source, index, bad, quarantine_raw(row))
            except DataError as e:
                raise DataError(f"{source}: row {index}: {e}") from None
    report = report_of(quarantine, source, total, len(records), fmt, render_chat is not None)
    return records, report


def report_of(
    quarantine: Quarantine, source: str, total: int, kept: int, fmt: str | None = None, rendered: bool = False
) -> QuarantineReport:
    """The report of a closed quarantine."""
    path = quarantine.path if quarantine.counts else None
    return QuarantineReport(
        source, total, kept, dict(quarantine.counts), path and str(path), dict(quarantine.examples),
        fmt, rendered and fmt == CONVERSATIONAL,
    )  # fmt: skip


def validate_source(
    cfg: DataConfig,
    quarantine_path: str | os.PathLike,
    render_chat: ChatRenderer | None = None,
    source: str | None = None,
    texts: bool = False,
) -> tuple[list[PreferenceRecord | ChatRecord | TextRecord], QuarantineReport]:
    """Read `source` (default `cfg.source`), validate every row, and enforce `cfg.max_bad_fraction`.
    `texts`: the source holds SFT texts rather than preference pairs. Without `render_chat`,
    conversational rows are checked for structure only, kept as ChatRecords, and the report's
    summary says that rendering was not checked."""
    src = source or cfg.source
    rows = iter_rows(src, cfg.format, cfg.split, cfg.max_rows)
    records, report = validate_rows(rows, cfg.columns, render_chat, Quarantine(quarantine_path), src, texts)
    check_bad_fraction(report, cfg.max_bad_fraction)
    return records, report


def no_rows(source: str) -> str:
    """The one line for a source with no rows at all, saying why when it is a file."""
    path = Path(source)
    if path.is_file():
        why = "the file is empty" if path.stat().st_size == 0 else "every line of the file is blank"
        return f"{source} has no rows: {why}"
    return f"{source} has no rows"


def check_bad_fraction(report: QuarantineReport, max_bad_fraction: float) -> None:
    """DataError when the source had no rows, no good rows, or more bad rows than allowed. The
    message is one line; it ends with the first row of the most common reason, whose detail names
    the problem (e.g. the missing column and the `data.columns` override to set)."""
    if report.total == 0:
        raise DataError(no_rows(report.source))
    ranked = _by_count(report.counts)
    reasons = ", ".join(f"{r}: {n}" for r, n in ranked)
    example = report.examples.get(ranked[0][0]) if ranked else None
    first = f"; first {ranked[0][0]}: {example}" if example else ""
    if report.bad_fraction > max_bad_fraction:
        raise DataError(
            f"{report.source}: {report.bad} of {report.total} rows ({100 * report.bad_fraction:.1f}%) were "
            f"quarantined, above data.max_bad_fraction={max_bad_fraction}; "
            f"see {report.path} ({reasons}){first}"
        )
    if report.kept == 0:
        raise DataError(
            f"{report.source}: none of its {report.total} rows is valid; see {report.path} ({reasons}){first}"
        )
