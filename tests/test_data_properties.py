"""Bad input, property-based: arbitrary JSON-lines files through `raydpo data validate` and Ray Data.

Files are built from lines of every kind: rows with wrong types, missing, null and extra fields, empty
and huge strings, Unicode edge cases (lone surrogate escapes such as "\\ud800", which are JSON syntax
but not text), chosen equal to rejected, malformed conversations (bad roles, non-string content,
missing keys), non-objects, invalid UTF-8 and broken JSON. One generator (`make_file`) serves both
tests: hypothesis drives it for many small files through the `validate_source` path and the row check
the Ray stage runs; a fixed seed gives the one larger file that goes through Ray itself.

Properties: nothing crashes (a whole source fails only with a one-line DataError naming it, when it
has no rows or no valid row); every row read is kept or quarantined, with a known reason, exactly
once (kept + quarantined = rows read); every kept row is sound and of the source's one format; and
the paths agree row by row (the same kept rows, the same reasons and details).
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raydpo.config import ColumnsConfig, DataConfig
from raydpo.data.pipeline import _split_lines, read_item
from raydpo.data.readers import BOM, decode_jsonl_line, iter_rows
from raydpo.data.schema import REASONS, BadRow, ChatRecord, PreferenceRecord, TextRecord
from raydpo.data.validate import chat_renderer, check_row, first_format, quarantine_raw, validate_source
from raydpo.errors import DataError

COLUMNS = ColumnsConfig()
EDGE_TEXT = [
    "", " ", "\t\n", "a", " yes", " no", "\x00", "\u200b", "\ufeff", "e\u0301", "\U0001f600", "\U0010ffff",
    "\u2028", "\r\n", '"', "\\", "\\ud800", "<|im_end|>", "<|endoftext|>", "<|im_start|>assistant\n",
    "x" * 20_000, "word " * 4_000,
]  # fmt: skip
SURROGATES = ["\ud800", "a\udfffb", "\udbff\udbff"]  # lone surrogates: written as JSON escapes
ROLES = ["user", "assistant", "system", "tool", "", " ", "USER", "bogus"]
RAW_LINES = [
    b'{"prompt": "x", "chosen": ',  # truncated JSON
    b'{"prompt": "p", "chosen": " a", "rejected": " b"} trailing',
    b"\xff\xfe",  # invalid UTF-8
    b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}',  # a latin-1 byte
    b'{"prompt": "\xed\xa0\x80", "chosen": " a", "rejected": " b"}',  # a surrogate encoded in UTF-8
    b'{"prompt": "p", "chosen": "\xe2\x82", "rejected": " b"}',  # a truncated multi-byte character
    b'{"prompt": "p", "chosen": "\\ud800", "rejected": " b"}',  # a lone surrogate escape
    b'{"prompt": "p", "chosen": " \\ud83d\\ude00", "rejected": " b"}',  # a surrogate pair: valid
    b'{"prompt": "p", "chosen": NaN, "rejected": " b"}',
    b'{"prompt": "p", "chosen": " a", "rejected": " b", "id": ' + b"9" * 5000 + b"}",  # int too long
    b"[" * 3000 + b"]" * 3000,  # nested too deeply
    BOM + b'{"prompt": "p", "chosen": " a", "rejected": " b"}',  # a BOM that is not at the file start
    b"null",
    b"42",
    b'"a string"',
    b"[1, 2]",
    b"{}",
    b"\x00",
]


# ----------------------------------------------------------------------------- one generator, two drivers


class RandomDraw:
    """The generator's choices from a seeded `random.Random` (the Ray test: one fixed file)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def choice(self, options: list):
        return self.rng.choice(options)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def text(self) -> str:
        if self.rng.random() < 0.3:
            return self.rng.choice(EDGE_TEXT + SURROGATES)
        alphabet = 'ab \n\t\u00e9\u4e2d\U0001f600\x00\u202e\ufffd"\\'
        return "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(0, 12)))


class HypothesisDraw:
    """The same choices drawn by hypothesis (which then shrinks a failing file)."""

    def __init__(self, draw):
        self.draw = draw

    def choice(self, options: list):
        return self.draw(st.sampled_from(options))

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(st.integers(lo, hi))

    def text(self) -> str:
        return self.draw(st.one_of(st.text(max_size=12), st.sampled_from(EDGE_TEXT + SURROGATES)))


def json_value(d, depth: int = 0):
    kinds = ["null", "bool", "int", "float", "text"] + (["list", "dict"] if depth < 2 else [])
    kind = d.choice(kinds)
    if kind == "list":
        return [json_value(d, depth + 1) for _ in range(d.integer(0, 3))]
    if kind == "dict":
        return {d.text(): json_value(d, depth + 1) for _ in range(d.integer(0, 3))}
    return {"null": None, "bool": d.choice([True, False]), "int": d.choice([0, -1, 2**63, 10**100]),
            "float": d.choice([0.5, -0.0, 1e308, 1e-320]), "text": d.text()}[kind]  # fmt: skip


def message(d, role: str) -> object:
    kind = d.choice(["ok"] * 40 + ["role", "content", "no_role", "no_content", "not_a_dict", "extra"])
    m = {"role": role, "content": d.text()}
    if kind == "role":
        m["role"] = d.choice(ROLES + [None, 3, ["user"]])
    elif kind == "content":
        m["content"] = json_value(d)
    elif kind in ("no_role", "no_content"):
        del m[kind[3:]]
    elif kind == "not_a_dict":
        return json_value(d)
    elif kind == "extra":
        m[d.text()] = json_value(d)
    return m


def conversation(d, roles: list[str]) -> list:
    return [message(d, d.choice(roles)) for _ in range(d.integer(0 if d.integer(0, 5) == 0 else 1, 3))]


def make_row(d) -> dict:
    """A row that is often valid, standard or conversational, with up to three mutations."""
    if d.choice(["standard", "chat"]) == "standard":
        row: dict = {"prompt": d.text() + "?", "chosen": " " + d.text(), "rejected": " " + d.text()}
    else:
        prompt = conversation(d, ["user", "system", "user"])
        row = {
            "prompt": prompt,
            "chosen": conversation(d, ["assistant"]),
            "rejected": conversation(d, ["assistant"]),
        }
    for _ in range(d.choice([0, 0, 0, 1, 1, 2, 3])):
        mutation = d.choice(["drop", "null", "wrong_type", "identical", "extra", "id", "empty", "implicit",
                             "other_format", "sft"])  # fmt: skip
        key = d.choice(["prompt", "chosen", "rejected"])
        if mutation == "drop":
            row.pop(key, None)
        elif mutation == "null":
            row[key] = None
        elif mutation == "wrong_type":
            row[key] = json_value(d)
        elif mutation == "identical" and "chosen" in row:
            row["rejected"] = row["chosen"]
        elif mutation == "extra":
            row[d.text()] = json_value(d)
        elif mutation == "id":
            row["id"] = json_value(d)
        elif mutation == "empty":
            row[key] = d.choice(["", "  \n", []])
        elif mutation == "implicit" and isinstance(row.get("prompt"), (str, list)):
            p = row.pop("prompt")
            for k in ("chosen", "rejected"):
                if isinstance(row.get(k), type(p)):
                    row[k] = p + row[k]
        elif mutation == "other_format":
            other = (
                " " + d.text() if isinstance(row.get(key), list) else [{"role": "assistant", "content": "x"}]
            )
            row[key] = other
        elif mutation == "sft":
            row = d.choice([{"text": d.text()}, {"prompt": d.text(), "completion": d.text()}, row])
    return row


def make_line(d) -> bytes:
    kind = d.choice(["row"] * 8 + ["non_object", "raw", "blank"])
    if kind == "row":
        row = make_row(d)
        try:
            return json.dumps(row, ensure_ascii=d.choice([True, False])).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: only its \\u escape can be written
            return json.dumps(row).encode("utf-8")
    if kind == "non_object":
        return json.dumps(d.choice([None, 1.5, [1, "a"], "text", True])).encode()
    if kind == "raw":
        return d.choice(RAW_LINES)
    return d.choice([b"", b" ", b"\t", b"\r"])


def make_file(d, n_lines: int) -> bytes:
    newline = d.choice([b"\n", b"\r\n"])
    lines = [make_line(d) for _ in range(n_lines)]
    return newline.join(lines) + d.choice([b"", newline])


@st.composite
def jsonl_files(draw, max_lines: int = 16) -> bytes:
    d = HypothesisDraw(draw)
    return make_file(d, d.integer(0, max_lines))


# ----------------------------------------------------------------------------- the expected outcome


def rows_read(data: bytes) -> int:
    """Rows in a JSON-lines file, counted from its bytes: non-blank lines split at b"\\n" (a BOM
    before the first line is not part of it)."""
    lines = data.split(b"\n")
    if lines and lines[0].startswith(BOM):
        lines[0] = lines[0][len(BOM) :]
    return sum(1 for line in lines if line.strip())


def judge(rows: list[tuple[int, object]], render=None, texts: bool = False) -> dict:
    """row index → record, or (reason, detail, raw as JSON text): the row check the Ray stage runs
    (`check_row` with the format decided up front by `first_format`)."""
    fmt = None if texts else first_format(rows, COLUMNS)
    out = {}
    for i, row in rows:
        try:
            out[i] = check_row(row, COLUMNS, render, texts, fmt)
        except BadRow as e:
            out[i] = (e.reason, e.detail, json.dumps(quarantine_raw(row), default=repr))
    return out


def check_outcomes(outcome: dict, n_rows: int, render, texts: bool) -> None:
    """The properties of one judged file that need no second path."""
    assert sorted(outcome) == list(range(n_rows))  # every row once: kept + quarantined = rows read
    kept = [v for v in outcome.values() if not isinstance(v, tuple)]
    for v in outcome.values():
        if isinstance(v, tuple):
            reason, detail, _ = v
            assert reason in REASONS and isinstance(detail, str) and detail.strip(), v
    if texts:
        assert all(isinstance(r, TextRecord) and r.completion.strip() for r in kept)
        return
    for r in kept:
        if isinstance(r, ChatRecord):
            assert render is None and r.chosen and r.rejected and r.chosen != r.rejected
            assert r.chosen[0]["role"] == r.rejected[0]["role"] == "assistant"
        else:
            assert isinstance(r, PreferenceRecord) and r.prompt.strip() and r.chosen != r.rejected
            assert all(isinstance(x, str) and x.strip() for x in (r.chosen, r.rejected))
    assert len({type(r) for r in kept}) <= 1  # one format: a row of the other one is mixed_format
    if render is not None:
        assert all(isinstance(r, PreferenceRecord) for r in kept)


def validated(path: Path, qpath: Path, render=None, texts: bool = False) -> tuple[dict, object]:
    """`raydpo data validate`'s path (`validate_source`) as row index → outcome, and its report (None
    when the whole source was refused, then with a one-line DataError naming it)."""
    cfg = DataConfig(source=str(path), max_bad_fraction=1.0)
    try:
        records, report = validate_source(cfg, qpath, render_chat=render, texts=texts)
    except DataError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        assert "has no rows" in str(e) or "none of its" in str(e), e
        records, report = [], None
    bad = [json.loads(x) for x in qpath.read_text().splitlines()] if qpath.exists() else []
    out = {q["row"]: (q["reason"], q["detail"], json.dumps(q["raw"])) for q in bad}
    assert len(out) == len(bad)  # one quarantine line per bad row
    kept_rows = [i for i in range(rows_read(path.read_bytes())) if i not in out]
    assert len(kept_rows) == len(records)
    out.update(zip(kept_rows, records))
    return out, report


def normalized(outcome: dict) -> dict:
    """Outcomes with raw values re-encoded as the quarantine file holds them."""
    return {i: (v[0], v[1], json.dumps(json.loads(v[2]))) if isinstance(v, tuple) else v
            for i, v in outcome.items()}  # fmt: skip


@pytest.fixture(scope="module")
def chatml():
    from raydpo.models.tiny import build_tokenizer

    return chat_renderer(build_tokenizer("qwen"))


# ----------------------------------------------------------------------------- the properties


@settings(max_examples=400, deadline=None, database=None)
@given(st.data())
def test_any_single_line_is_a_row_or_a_bad_row(data):
    """The row check alone, on one line at a time: a dict or a BadRow; then a record or a BadRow
    with a known reason, with and without a known format, as pairs and as SFT texts."""
    raw = make_line(HypothesisDraw(data.draw))
    row = decode_jsonl_line(raw, 1)
    assert isinstance(row, (dict, BadRow))
    for texts, fmt in [(False, None), (False, "standard"), (False, "conversational"), (True, None)]:
        try:
            rec = check_row(row, COLUMNS, None, texts, fmt)
        except BadRow as e:
            assert e.reason in REASONS and e.detail
            continue
        assert isinstance(rec, TextRecord if texts else (PreferenceRecord, ChatRecord))
        if fmt == "conversational":
            assert isinstance(rec, ChatRecord)
        elif fmt == "standard":
            assert isinstance(rec, PreferenceRecord)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=jsonl_files(), rendered=st.booleans(), texts=st.sampled_from([False, False, True]))
def test_validate_and_the_pipeline_rows_agree_on_any_file(chatml, data: bytes, rendered: bool, texts: bool):
    """Any file through `validate_source` and through the pipeline's own split-decode-check (what
    each Ray actor runs, without Ray): every row kept or quarantined once, for the same reason."""
    render = chatml if rendered else None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.jsonl"
        path.write_bytes(data)
        n = rows_read(data)
        got, report = validated(path, Path(tmp) / "q.jsonl", render, texts)
    items = _split_lines({"bytes": data})
    assert [it["row"] for it in items] == list(range(n))  # the pipeline splits lines as the reader does
    rows = [(it["row"], read_item(it["line"], it["data"], it["reason"], it["detail"])) for it in items]
    piped = judge(rows, render, texts)
    check_outcomes(piped, n, render, texts)
    assert normalized(piped) == got  # row by row: the same records, reasons, details and raw values
    if report is not None:  # (None: refused as a whole, no rows or no valid row)
        assert (
            report.total == n and report.kept + report.bad == n and sum(report.counts.values()) == report.bad
        )
        assert report.format == (None if texts else first_format(rows, COLUMNS))
        unrendered = "conversational rows: structure checked; rendering not checked (pass --tokenizer)"
        assert (unrendered in report.summary()) == (report.format == "conversational" and render is None)


# ----------------------------------------------------------------------------- through Ray


@pytest.mark.ray
def test_ray_pipeline_agrees_with_validate_row_by_row(ray_local, tmp_path: Path):
    """One file of a few hundred generated rows (fixed seed) through the Ray Data pipeline and
    through `validate_source` with the same chat template: the same rows kept and quarantined with
    the same reasons and details; tokenization may only add its own rejects, exactly those that
    `tokenize_pair` gives; the kept rows' token ids are those of `tokenize_pair`."""
    from raydpo.config import build_config
    from raydpo.data.pipeline import prepare_dataset
    from raydpo.data.tokenize import tokenize_pair
    from raydpo.models.loading import load_tokenizer, resolve_model_path

    d = RandomDraw(20251127)
    first = json.dumps({"id": "first", "prompt": "Q?", "chosen": " a", "rejected": " b"}).encode()
    same = {"id": "same", "prompt": "Q?", "chosen": " same" * 200 + " x", "rejected": " same" * 200 + " y"}
    lines = [first, json.dumps(same).encode(), *RAW_LINES, *(make_line(d) for _ in range(300))]
    tail = lines[1:]
    d.rng.shuffle(tail)
    data = b"\n".join([lines[0], *tail]) + b"\n"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data)
    n = rows_read(data)

    max_length, max_prompt = 96, 48
    data_cfg = {
        "source": str(path),
        "max_bad_fraction": 1.0,
        "max_length": max_length,
        "max_prompt_length": max_prompt,
    }
    policy = resolve_model_path("builtin:tiny-qwen")
    cfg = build_config({"model": {"policy": policy}, "train": {"batch_size": 1}, "data": data_cfg})
    tok = load_tokenizer(cfg.model)
    render = chat_renderer(tok)
    expected, vreport = validated(path, tmp_path / "q_validate.jsonl", render)
    check_outcomes(expected, n, render, texts=False)
    reasons = {v[0] for v in expected.values() if isinstance(v, tuple)}
    assert {
        "undecodable",
        "wrong_type",
        "missing_field",
        "identical",
        "mixed_format",
        "empty_text",
    } <= reasons

    decoded = dict(iter_rows(str(path)))
    pairs = {}
    for i, v in list(expected.items()):  # tokenization's own rejects, as the actor makes them
        if not isinstance(v, tuple):
            try:
                pairs[i] = tokenize_pair(v, tok, max_length, max_prompt)
            except BadRow as e:
                expected[i] = (e.reason, e.detail, json.dumps(decoded[i]))
    assert len(pairs) > 20 and len(expected) - len(pairs) > 200
    assert "chosen and rejected are the same tokens after truncation" in {
        v[1] for v in expected.values() if isinstance(v, tuple)
    }

    good, report = prepare_dataset(cfg, str(path), tmp_path / "q_ray.jsonl")
    assert report.total == n == vreport.total and report.kept + report.bad == n
    assert report.format == vreport.format == "standard"
    bad = [json.loads(x) for x in (tmp_path / "q_ray.jsonl").read_text().splitlines()]
    got = {q["row"]: (q["reason"], q["detail"], json.dumps(q["raw"])) for q in bad}
    assert len(got) == len(bad) == report.bad
    assert got == {i: v for i, v in normalized(expected).items() if isinstance(v, tuple)}
    kept = good.take_all()
    assert len(kept) == len(pairs) == report.kept

    def key(r) -> str:
        ids = [[int(t) for t in r[c]] for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
        return json.dumps([r["id"], *ids])

    want = [key({"id": p.id, "prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                 "rejected_ids": p.rejected_ids}) for p in pairs.values()]  # fmt: skip
    assert sorted(map(key, kept)) == sorted(want)
