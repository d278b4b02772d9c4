"""Readers, validation and quarantine on real files built in tmp_path (no network)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from raydpo.config import ColumnsConfig, DataConfig
from raydpo.data import readers
from raydpo.data.builtin import tiny_prefs
from raydpo.data.readers import UnreadableRow, decode_jsonl_line, detect_format, iter_rows, jsonl_lines
from raydpo.data.schema import REASONS, BadRow, ChatRecord, PreferenceRecord, TextRecord
from raydpo.data.validate import (
    Quarantine,
    QuarantineReport,
    canonicalize,
    chat_renderer,
    check_bad_fraction,
    check_row,
    first_format,
    quarantine_raw,
    validate_rows,
    validate_source,
)
from raydpo.errors import DataError

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GOOD = [
    {"id": 1, "prompt": "Review:", "chosen": " great", "rejected": " bad"},
    {"id": "b", "prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "extra": [1, 2]},
    {"prompt": "Say hi.", "chosen": " hi", "rejected": " go away"},
]
GOOD_RECORDS = [
    PreferenceRecord("Review:", " great", " bad", "1"),
    PreferenceRecord("Q: 2+2?", " 4", " 5", "b"),
    PreferenceRecord("Say hi.", " hi", " go away", None),
]


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_tokenizer(template: str | None = TEMPLATE):
    """A word-level fast tokenizer with a few words, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "hi", "hello", "yes", "no", "bye"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = template
    return tok


# ----------------------------------------------------------------------------- the mixed JSONL file

# (line bytes, expected reason or None for a good row); blank lines are not rows.
MIXED = [
    (json.dumps(GOOD[0]).encode(), None),  # row 0
    (b'{"prompt": "x", "chosen": ', "undecodable"),  # row 1: bad JSON
    (b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}', "undecodable"),  # row 2: latin-1 byte
    (b"", None),  # blank line: skipped, not numbered
    (b"[1, 2, 3]", "wrong_type"),  # row 3: not an object
    (json.dumps(GOOD[1]).encode(), None),  # row 4
    (json.dumps({"prompt": "p", "chosen": " a"}).encode(), "missing_field"),  # row 5
    (json.dumps({"prompt": "p", "chosen": 3, "rejected": " b"}).encode(), "wrong_type"),  # row 6
    (json.dumps({"prompt": "p", "chosen": "   ", "rejected": " b"}).encode(), "empty_text"),  # row 7
    (json.dumps({"prompt": "p", "chosen": " same", "rejected": " same"}).encode(), "identical"),  # row 8
    (json.dumps({"prompt": [{"role": "user"}], "chosen": [], "rejected": []}).encode(), "bad_message"),  # 9
    (json.dumps({"chosen": "yes please", "rejected": "no thanks"}).encode(), "no_shared_prompt"),  # row 10
    (json.dumps(GOOD[2]).encode(), None),  # row 11
    (json.dumps({"prompt": None, "chosen": " a", "rejected": " b"}).encode(), "missing_field"),  # row 12
]
EXPECTED_BAD = {
    1: "undecodable",
    2: "undecodable",
    3: "wrong_type",
    5: "missing_field",
    6: "wrong_type",
    7: "empty_text",
    8: "identical",
    9: "bad_message",
    10: "no_shared_prompt",
    12: "missing_field",
}


@pytest.fixture
def mixed_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in MIXED) + b"\n")
    return path


def read_quarantine(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mixed_jsonl_keeps_good_rows_and_quarantines_every_bad_one(mixed_jsonl: Path, tmp_path: Path):
    qpath = tmp_path / "out" / "quarantine.jsonl"
    cfg = DataConfig(source=str(mixed_jsonl), max_bad_fraction=0.9)
    records, report = validate_source(cfg, qpath)

    assert records == GOOD_RECORDS
    lines = read_quarantine(qpath)
    assert {q["row"]: q["reason"] for q in lines} == EXPECTED_BAD
    assert all(q["source"] == str(mixed_jsonl) and q["reason"] in REASONS for q in lines)
    by_row = {q["row"]: q for q in lines}
    assert by_row[1]["detail"] == "line 2: Expecting value: line 1 column 27 (char 26)"
    assert by_row[1]["raw"] == '{"prompt": "x", "chosen": '
    assert by_row[2]["detail"].startswith("line 3: invalid UTF-8")
    assert by_row[3]["raw"] == "[1, 2, 3]" and "line 5" in by_row[3]["detail"]
    assert by_row[5]["raw"] == {"prompt": "p", "chosen": " a"}
    assert "'rejected'" in by_row[5]["detail"]
    assert "'chosen'" in by_row[6]["detail"] and "int" in by_row[6]["detail"]

    assert report.total == 13 and report.kept == 3 and report.bad == 10
    assert report.counts == {
        "undecodable": 2,
        "wrong_type": 2,
        "missing_field": 2,
        "empty_text": 1,
        "identical": 1,
        "bad_message": 1,
        "no_shared_prompt": 1,
    }
    assert report.path == str(qpath)
    assert report.bad_fraction == pytest.approx(10 / 13)
    summary = report.summary()
    assert "13 rows, 3 kept, 10 quarantined (76.9%)" in summary and str(qpath) in summary
    assert "undecodable: 2" in summary
    assert report.to_dict()["bad"] == 10
    assert not qpath.with_name("quarantine.jsonl.tmp").exists()


def test_bad_fraction_above_threshold_is_a_data_error(mixed_jsonl: Path, tmp_path: Path):
    qpath = tmp_path / "q.jsonl"
    cfg = DataConfig(source=str(mixed_jsonl), max_bad_fraction=0.05)
    with pytest.raises(DataError) as err:
        validate_source(cfg, qpath)
    msg = str(err.value)
    assert str(mixed_jsonl) in msg and "data.max_bad_fraction=0.05" in msg
    assert "10 of 13 rows (76.9%)" in msg and str(qpath) in msg and "undecodable: 2" in msg
    assert qpath.exists()  # the quarantine file is there to look at


def test_check_bad_fraction_edges():
    check_bad_fraction(QuarantineReport("s", 100, 95, {"identical": 5}, "q"), 0.05)  # at the limit: ok
    with pytest.raises(DataError, match=r"s: 12 of 100 rows \(12.0%\).*\(missing_field: 7, identical: 5\)"):
        check_bad_fraction(QuarantineReport("s", 100, 88, {"identical": 5, "missing_field": 7}, "q"), 0.05)
    with pytest.raises(DataError, match="s has no rows"):
        check_bad_fraction(QuarantineReport("s", 0, 0), 1.0)
    with pytest.raises(DataError, match="none of its 2 rows is valid"):
        check_bad_fraction(QuarantineReport("s", 2, 0, {"identical": 2}, "q"), 1.0)


# ----------------------------------------------------------------------------- other formats


def test_parquet_and_hf_directories_give_the_same_records(tmp_path: Path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"id": str(r.get("id")) if "id" in r else None, **{k: r[k] for k in ("prompt", "chosen", "rejected")}}
        for r in GOOD
    ]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=2)
    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(hf_dir))
    dict_dir = tmp_path / "hf_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(dict_dir))

    cfg = DataConfig()
    results = [
        validate_source(cfg, tmp_path / f"q{i}.jsonl", source=str(s))[0]
        for i, s in enumerate([jsonl, parquet, hf_dir, dict_dir])
    ]
    assert all(r == GOOD_RECORDS for r in results)
    assert [detect_format(str(s)) for s in (jsonl, parquet, hf_dir, dict_dir)] == [
        "jsonl",
        "parquet",
        "hf",
        "hf",
    ]
    assert not list(tmp_path.glob("q*.jsonl*"))  # nothing bad, so no quarantine files

    with pytest.raises(DataError, match=r"no split 'test'; available splits: train"):
        list(iter_rows(str(dict_dir), split="test"))


def test_parquet_nulls_are_missing_fields(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "n.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "chosen": None, "rejected": " b"}]), path)
    with pytest.raises(DataError, match="none of its 1 rows is valid"):
        validate_source(DataConfig(source=str(path), max_bad_fraction=1.0), tmp_path / "q.jsonl")
    assert read_quarantine(tmp_path / "q.jsonl")[0]["reason"] == "missing_field"


def test_unreadable_parquet_names_the_file(tmp_path: Path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a readable parquet file"):
        iter_rows(str(path))


def test_missing_and_unrecognized_sources(tmp_path: Path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"data source '{missing}' does not exist"):
        iter_rows(missing)
    with pytest.raises(DataError, match="does not exist"):
        iter_rows(str(tmp_path / "nope.parquet"), fmt="parquet")
    odd = tmp_path / "data.txt"
    odd.write_text("hello")
    with pytest.raises(DataError, match="cannot tell its format.*hub name like 'owner/name'"):
        iter_rows(str(odd))
    with pytest.raises(DataError, match="not a saved HF dataset"):
        iter_rows(str(tmp_path))
    with pytest.raises(DataError, match="unknown built-in data source 'builtin:nope'"):
        iter_rows("builtin:nope")
    with pytest.raises(DataError, match="data format 'csv'"):
        iter_rows(str(odd), fmt="csv")


def test_unknown_hub_dataset_is_a_one_line_data_error(monkeypatch: pytest.MonkeyPatch):
    """The hub path cannot succeed offline; it must still fail as a DataError, quickly."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert detect_format("nobody-raydpo/no-such-dataset") == "hf"
    with pytest.raises(
        DataError, match="could not load Hugging Face dataset 'nobody-raydpo/no-such-dataset'"
    ) as e:
        iter_rows("nobody-raydpo/no-such-dataset")
    assert "\n" not in str(e.value)


def test_max_rows_counts_good_and_bad_rows(mixed_jsonl: Path, tmp_path: Path):
    assert [i for i, _ in iter_rows(str(mixed_jsonl), max_rows=4)] == [0, 1, 2, 3]
    cfg = DataConfig(source=str(mixed_jsonl), max_rows=1)
    records, report = validate_source(cfg, tmp_path / "q.jsonl")
    assert records == GOOD_RECORDS[:1] and report.total == 1 and report.path is None


def test_builtin_source_gives_valid_deterministic_records(tmp_path: Path):
    records, report = validate_source(DataConfig(), tmp_path / "q.jsonl")
    assert len(records) == 64 and report.kept == 64 and report.path is None
    assert all(r.chosen.startswith(" ") and r.rejected.startswith(" ") and r.id for r in records)
    assert len({r.id for r in records}) == 64
    assert tiny_prefs(8, seed=3) == tiny_prefs(8, seed=3) != tiny_prefs(8, seed=4)
    assert len(list(iter_rows("builtin:tiny-prefs", max_rows=5))) == 5


# ----------------------------------------------------------------------------- shapes


def test_custom_column_names(tmp_path: Path):
    cols = ColumnsConfig(prompt="question", chosen="good", rejected="bad", id="uid")
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [{"uid": 7, "question": "Q?", "good": " yes", "bad": " no"}, {"question": "Q?", "good": " yes"}],
    )
    cfg = DataConfig(source=str(path), columns=cols, max_bad_fraction=0.5)
    records, report = validate_source(cfg, tmp_path / "q.jsonl")
    assert records == [PreferenceRecord("Q?", " yes", " no", "7")]
    [line] = read_quarantine(tmp_path / "q.jsonl")
    assert line["reason"] == "missing_field" and "'bad'" in line["detail"] and line["row"] == 1


def test_implicit_prompt_from_strings():
    cols = ColumnsConfig()
    rec = canonicalize({"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}, cols)
    assert rec == PreferenceRecord("Q: hi A:", " yes", " no")
    # divergence not after a space: the prefix is kept whole (TRL's rule)
    assert canonicalize({"chosen": "ab1", "rejected": "ab2"}, cols) == PreferenceRecord("ab", "1", "2")
    for chosen, rejected in [("yes", "no"), (" yes", " no"), ("Q: a", "Q: a b")]:
        with pytest.raises(BadRow) as e:
            canonicalize({"chosen": chosen, "rejected": rejected}, cols)
        assert e.value.reason == "no_shared_prompt"


def test_implicit_prompt_from_messages():
    render = chat_renderer(tiny_tokenizer())
    row = {
        "chosen": [msg("user", "hi"), msg("assistant", "hello")],
        "rejected": [msg("user", "hi"), msg("assistant", "bye")],
    }
    rec = canonicalize(row, ColumnsConfig(), render)
    assert rec == PreferenceRecord("<|user|>hi\n<|assistant|>", "hello\n", "bye\n")
    row = {"chosen": [msg("assistant", "hello")], "rejected": [msg("assistant", "bye")]}
    with pytest.raises(BadRow) as e:
        canonicalize(row, ColumnsConfig(), render)
    assert e.value.reason == "no_shared_prompt"


def test_conversational_rows_render_with_the_chat_template():
    render = chat_renderer(tiny_tokenizer())
    row = {
        "id": 3,
        "prompt": [msg("system", "be nice"), msg("user", "hi")],
        "chosen": [msg("assistant", "hello")],
        "rejected": [msg("assistant", "bye")],
    }
    rec = canonicalize(row, ColumnsConfig(), render)
    assert rec == PreferenceRecord("<|system|>be nice\n<|user|>hi\n<|assistant|>", "hello\n", "bye\n", "3")
    assert rec.prompt + rec.chosen == render(row["prompt"] + row["chosen"], False)


def test_conversational_errors():
    render = chat_renderer(tiny_tokenizer())
    cols = ColumnsConfig()
    p, c, r = [msg("user", "hi")], [msg("assistant", "yes")], [msg("assistant", "no")]
    cases = {
        "bad_message": {"prompt": p, "chosen": [{"role": "assistant", "content": 5}], "rejected": r},
        "empty_text": {"prompt": p, "chosen": [msg("assistant", " ")], "rejected": r},
        "identical": {"prompt": p, "chosen": c, "rejected": list(c)},
        "wrong_type": {"prompt": "hi", "chosen": c, "rejected": r},
    }
    for reason, row in cases.items():
        with pytest.raises(BadRow) as e:
            canonicalize(row, cols, render)
        assert e.value.reason == reason, row
    # a template whose prompt rendering is not a prefix of the full chat
    odd = chat_renderer(tiny_tokenizer("{{ messages | length }}{% if add_generation_prompt %}!{% endif %}"))
    with pytest.raises(BadRow) as e:
        canonicalize({"prompt": p, "chosen": c, "rejected": r}, cols, odd)
    assert e.value.reason == "chat_template"
    # a template that raises for this row
    failing = chat_renderer(tiny_tokenizer("{{ raise_exception('no system role') }}"))
    with pytest.raises(BadRow) as e:
        canonicalize({"prompt": p, "chosen": c, "rejected": r}, cols, failing)
    assert e.value.reason == "chat_template" and "no system role" in e.value.detail


CHAT_ROW = {
    "prompt": [msg("user", "hi")],
    "chosen": [msg("assistant", "yes")],
    "rejected": [msg("assistant", "no")],
}


def test_conversational_data_without_a_template_is_checked_for_structure(tmp_path: Path):
    """`raydpo data validate` without --tokenizer: conversational rows are checked (roles, content
    strings, the prompt/response split), kept unrendered, and the summary says rendering was not
    checked; with a template they are rendered."""
    with pytest.raises(DataError, match="needs a tokenizer with a chat template; .* has none"):
        chat_renderer(tiny_tokenizer(template=None))
    rows = [
        CHAT_ROW,
        {**CHAT_ROW, "chosen": [msg("", "yes")]},  # 1: blank role
        {**CHAT_ROW, "chosen": [{"role": "assistant", "content": ["yes"]}]},  # 2: non-string content
        {**CHAT_ROW, "rejected": [{"content": "no"}]},  # 3: no role
        {**CHAT_ROW, "chosen": [msg("user", "yes")]},  # 4: a response that is not the assistant's
        {
            "chosen": [msg("user", "hi"), msg("assistant", "a")],
            "rejected": [msg("user", "hi"), msg("user", "b")],
        },
        {
            "id": 6,
            "chosen": [msg("user", "hi"), msg("assistant", "a")],
            "rejected": [msg("user", "hi"), msg("assistant", "b")],
        },  # fmt: skip
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = DataConfig(source=str(path), max_bad_fraction=1.0)
    records, report = validate_source(cfg, tmp_path / "q.jsonl")
    assert records == [
        ChatRecord(CHAT_ROW["prompt"], CHAT_ROW["chosen"], CHAT_ROW["rejected"]),
        ChatRecord([msg("user", "hi")], [msg("assistant", "a")], [msg("assistant", "b")], "6"),
    ]
    assert report.counts == {"bad_message": 5} and report.format == "conversational"
    details = [q["detail"] for q in read_quarantine(tmp_path / "q.jsonl")]
    assert details == [
        "chosen[0]: 'role' is empty",
        "chosen[0]: 'content' must be a str, got a list",
        "rejected[0]: 'role' must be a str, got missing",
        "the 'chosen' response starts with a 'user' message, not 'assistant'",
        "the 'rejected' response starts with a 'user' message, not 'assistant'",
    ]
    summary = report.summary()
    assert "conversational rows: structure checked; rendering not checked (pass --tokenizer)" in summary

    render = chat_renderer(tiny_tokenizer())
    records, report = validate_source(cfg, tmp_path / "q.jsonl", render_chat=render)
    assert records[0] == PreferenceRecord("<|user|>hi\n<|assistant|>", "yes\n", "no\n")
    assert report.kept == 2 and "rendering not checked" not in report.summary()
    assert "conversational rows: structure checked and rendered with the chat template" in report.summary()
    plain = write_jsonl(tmp_path / "plain.jsonl", GOOD)
    _, report = validate_source(DataConfig(source=str(plain)), tmp_path / "q.jsonl")
    assert report.format == "standard" and "conversational rows" not in report.summary()


def test_the_first_valid_row_decides_the_format_and_other_rows_are_mixed_format(tmp_path: Path):
    """A conversational row among strings (or the reverse) is quarantined as mixed_format, not a
    whole-run abort; rows before the first valid one are bad for their own reasons."""
    rows = [
        {"prompt": [msg("user", "hi")], "chosen": [], "rejected": []},  # 0: bad, and not counted
        GOOD[0],  # 1: the first valid row: strings
        CHAT_ROW,  # 2: mixed_format
        {**CHAT_ROW, "chosen": [{"role": "assistant"}]},  # 3: a malformed chat row keeps its own reason
        GOOD[1],
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    cfg = DataConfig(source=str(path), max_bad_fraction=1.0)
    records, report = validate_source(cfg, tmp_path / "q.jsonl")
    assert records == GOOD_RECORDS[:2] and report.format == "standard"
    lines = read_quarantine(tmp_path / "q.jsonl")
    assert [(q["row"], q["reason"]) for q in lines] == [
        (0, "empty_text"),
        (2, "mixed_format"),
        (3, "bad_message"),
    ]
    assert lines[1]["detail"] == (
        "a conversational row (prompt/chosen/rejected as message lists) in a standard source; "
        "the source's first valid row decides its format"
    )
    # the reverse: a chat source with a string row
    path = write_jsonl(tmp_path / "r.jsonl", [CHAT_ROW, GOOD[0], CHAT_ROW])
    records, report = validate_source(
        DataConfig(source=str(path), max_bad_fraction=1.0), tmp_path / "q.jsonl"
    )
    assert len(records) == 2 and report.counts == {"mixed_format": 1} and report.format == "conversational"
    assert first_format(iter_rows(str(path)), ColumnsConfig()) == "conversational"
    assert first_format([(0, BadRow("undecodable", "x")), (1, {"x": 1})], ColumnsConfig()) is None


def test_standard_row_checks():
    cols = ColumnsConfig()
    cases = {
        "empty_text": {"prompt": " \n", "chosen": " a", "rejected": " b"},
        "wrong_type": {"prompt": "p", "chosen": {"text": "a"}, "rejected": " b"},
        "missing_field": {"prompt": "p", "rejected": " b"},
    }
    for reason, row in cases.items():
        with pytest.raises(BadRow) as e:
            canonicalize(row, cols)
        assert e.value.reason == reason
    assert canonicalize({"prompt": "p", "chosen": "a", "rejected": "b", "id": None}, cols).id is None


# ----------------------------------------------------------------------------- quarantine file


def test_quarantine_is_atomic_and_removes_stale_files(tmp_path: Path):
    qpath = tmp_path / "q.jsonl"
    qpath.write_text("stale\n")
    rows = [(0, {"prompt": "p", "chosen": " a", "rejected": " b"})]
    _, report = validate_rows(rows, ColumnsConfig(), None, Quarantine(qpath), "s")
    assert report.path is None and not qpath.exists()  # nothing bad: no file, stale one gone

    q = Quarantine(qpath)
    q.add("s", 0, BadRow("identical", "x"), {"k": object(), "b": b"\xff"})
    assert not qpath.exists() and q.tmp.exists()  # only the temp file until close
    assert q.close() == qpath and not q.tmp.exists()
    [line] = read_quarantine(qpath)
    assert line["reason"] == "identical" and line["raw"]["b"] == "b'\\xff'"

    def broken_rows():
        yield 0, {"prompt": "p", "chosen": " a", "rejected": " a"}
        raise DataError("reader failed")

    with pytest.raises(DataError, match="reader failed"):
        validate_rows(broken_rows(), ColumnsConfig(), None, Quarantine(tmp_path / "q2.jsonl"), "s")
    assert not (tmp_path / "q2.jsonl").exists() and not (tmp_path / "q2.jsonl.tmp").exists()


def test_quarantine_raw_falls_back_to_repr(tmp_path: Path):
    """Non-string dict keys cannot be JSON keys: the whole raw value is stored as its repr."""
    with Quarantine(tmp_path / "q.jsonl") as q:
        q.add("s", 4, BadRow("wrong_type", "x"), {(1, 2): "tuple key"})
    [line] = read_quarantine(tmp_path / "q.jsonl")
    assert line == {
        "source": "s",
        "row": 4,
        "reason": "wrong_type",
        "detail": "x",
        "raw": "{(1, 2): 'tuple key'}",
    }


def test_quarantine_close_twice_keeps_the_file(tmp_path):
    from raydpo.data.schema import BadRow
    from raydpo.data.validate import Quarantine

    with Quarantine(tmp_path / "q.jsonl") as q:
        q.add("src", 3, BadRow("identical", "same"), {"x": 1})
        assert q.close() == tmp_path / "q.jsonl"
    assert (tmp_path / "q.jsonl").read_text().count("\n") == 1


# ----------------------------------------------------------------------------- renamed columns


def test_missing_column_names_it_and_suggests_the_override():
    cols = ColumnsConfig()
    with pytest.raises(BadRow) as e:
        canonicalize({"question": "Q?", "good": " yes", "bad": " no"}, cols)
    assert e.value.reason == "missing_field"
    assert e.value.detail == "missing 'chosen' (columns: question, good, bad); set data.columns.chosen=<name>"
    # only the columns that other data.columns settings already take: nothing to suggest
    with pytest.raises(BadRow) as e:
        canonicalize({"id": 3, "prompt": "p", "chosen": " a", "score": 1.5}, cols)
    assert e.value.detail == "missing 'rejected' (columns: id, prompt, chosen, score)"
    with pytest.raises(BadRow) as e:
        canonicalize({"prompt": "p", "chosen": None, "rejected": " b"}, cols)
    assert e.value.detail == "column 'chosen' is null"
    with pytest.raises(BadRow) as e:
        canonicalize({}, cols)
    assert e.value.detail == "missing 'chosen' (the row has no columns)"
    with pytest.raises(BadRow) as e:
        canonicalize({f"c{i}": "x" for i in range(12)}, cols)
    assert "(columns: c0, c1, c2, c3, c4, c5, c6, c7, ...); set data.columns.chosen=<name>" in e.value.detail


def test_renamed_columns_error_names_the_column_in_one_line(tmp_path: Path):
    rows = [{"question": f"Q{i}?", "good": f" yes {i}", "bad": f" no {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "renamed.jsonl", rows)
    with pytest.raises(DataError) as err:
        validate_source(DataConfig(source=str(path)), tmp_path / "q.jsonl")
    msg = str(err.value)
    assert "20 of 20 rows (100.0%) were quarantined" in msg and "(missing_field: 20)" in msg
    assert msg.endswith(
        "; first missing_field: row 0: missing 'chosen' (columns: question, good, bad); "
        "set data.columns.chosen=<name>"
    )
    assert "\n" not in msg
    # with the override the same file is valid
    cols = ColumnsConfig(prompt="question", chosen="good", rejected="bad")
    records, report = validate_source(DataConfig(source=str(path), columns=cols), tmp_path / "q.jsonl")
    assert report.kept == 20 and records[0] == PreferenceRecord("Q0?", " yes 0", " no 0")


def test_bad_fraction_error_shows_the_first_row_of_the_most_common_reason(tmp_path: Path):
    rows = [
        {"prompt": "p", "chosen": " a", "rejected": " a"},  # identical (row 0, once)
        {"prompt": "p", "chosen": " a", "rejected": " b"},
        {"prompt": "p", "chosen": 3, "rejected": " b"},  # wrong_type (rows 2 and 3)
        {"prompt": "p", "chosen": " a", "rejected": 4},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as err:
        validate_source(DataConfig(source=str(path)), tmp_path / "q.jsonl")
    msg = str(err.value)
    assert "(wrong_type: 2, identical: 1); first wrong_type: row 2: column 'chosen' is a int" in msg
    report = QuarantineReport("s", 10, 9, {"identical": 1}, "q", {"identical": "row 4: same"})
    with pytest.raises(DataError, match=r"none of its 10 rows.*first identical: row 4: same$"):
        check_bad_fraction(QuarantineReport("s", 10, 0, {"identical": 10}, "q", report.examples), 1.0)
    check_bad_fraction(report, 0.5)  # within the limit: no error


def test_quarantine_keeps_the_first_detail_of_each_reason_on_one_line(tmp_path: Path):
    with Quarantine(tmp_path / "q.jsonl") as q:
        q.add("s", 2, BadRow("identical", "first\n  one"), {})
        q.add("s", 5, BadRow("identical", "second"), {})
        q.add("s", None, BadRow("wrong_type", "no row"), {})
    assert q.examples == {"identical": "row 2: first one", "wrong_type": "no row"}


# ----------------------------------------------------------------------------- SFT text rows


def test_text_rows_check():
    cols = ColumnsConfig()
    assert check_row({"text": "hello", "id": 4}, cols, texts=True) == TextRecord("", "hello", "4")
    assert check_row({"prompt": "Q:", "completion": " A"}, cols, texts=True) == TextRecord("Q:", " A")
    cases = {
        "missing_field": {"content": "hello"},
        "wrong_type": {"text": 5},
        "empty_text": {"prompt": "Q:", "completion": "  "},
    }
    for reason, row in cases.items():
        with pytest.raises(BadRow) as e:
            check_row(row, cols, texts=True)
        assert e.value.reason == reason, row
    with pytest.raises(BadRow) as e:
        check_row({"content": "hello"}, cols, texts=True)
    assert e.value.detail == "missing 'text' or 'completion' (columns: content); set data.columns.text=<name>"
    with pytest.raises(BadRow) as e:
        check_row({"prompt": "Q:", "answer": " A"}, cols, texts=True)
    assert e.value.detail.endswith("(columns: prompt, answer); set data.columns.completion=<name>")
    with pytest.raises(BadRow) as e:  # a pair row's "completion" column may well be its chosen one
        canonicalize({"prompt": "Q:", "completion": " A", "rejected": " B"}, cols)
    assert e.value.detail.endswith("set data.columns.chosen=<name>")
    with pytest.raises(BadRow, match="column 'text' is null"):
        check_row({"text": None}, cols, texts=True)


def test_validate_source_of_texts(tmp_path: Path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}, {"prompt": "Q", "completion": " A"}, {"x": 1}])
    cfg = DataConfig(source=str(path), max_bad_fraction=0.5)
    records, report = validate_source(cfg, tmp_path / "q.jsonl", texts=True)
    assert records == [TextRecord("", "a b"), TextRecord("Q", " A")] and report.counts == {"missing_field": 1}


# ----------------------------------------------------------------------------- the pipeline's rows


def pipeline_rows(items: list[dict]) -> list:
    """What the Ray actor stage checks: each item back into a reader's Row (no Ray needed)."""
    from raydpo.data.pipeline import read_item

    return [(it["row"], read_item(it["line"], it["data"], it["reason"], it["detail"])) for it in items]


def outcomes(rows) -> dict:
    """row index → record, or (reason, detail, raw) as a quarantine line holds them."""
    out = {}
    for i, row in rows:
        try:
            out[i] = check_row(row, ColumnsConfig())
        except BadRow as e:
            out[i] = (e.reason, e.detail, quarantine_raw(row))
    return out


def test_pipeline_and_validate_judge_every_jsonl_row_alike(mixed_jsonl: Path, tmp_path: Path):
    """`raydpo data validate` and training split, decode and check JSON lines with the same code."""
    from raydpo.data.pipeline import _split_lines

    items = _split_lines({"bytes": mixed_jsonl.read_bytes()})
    assert [(it["row"], it["line"]) for it in items][:4] == [(0, 1), (1, 2), (2, 3), (3, 5)]
    piped = outcomes(pipeline_rows(items))
    assert piped == outcomes(iter_rows(str(mixed_jsonl)))
    assert [piped[i] for i in (0, 4, 11)] == GOOD_RECORDS
    assert {i: v[0] for i, v in piped.items() if isinstance(v, tuple)} == EXPECTED_BAD
    assert piped[3] == ("wrong_type", "line 5: a JSON list, not an object", "[1, 2, 3]")

    # and the quarantine lines hold the same raw values on both paths
    validate_source(DataConfig(source=str(mixed_jsonl), max_bad_fraction=0.9), tmp_path / "q.jsonl")
    lines = {q["row"]: (q["reason"], q["detail"], q["raw"]) for q in read_quarantine(tmp_path / "q.jsonl")}
    assert lines == {
        i: (*v[:2], json.loads(json.dumps(v[2]))) for i, v in piped.items() if isinstance(v, tuple)
    }


def test_jsonl_line_decoder():
    assert decode_jsonl_line(b'{"a": 1}\r\n', 3) == {"a": 1}
    bad = decode_jsonl_line(b"\xff{}\n", 7)
    assert isinstance(bad, UnreadableRow) and bad.reason == "undecodable"
    assert bad.detail.startswith("line 7: invalid UTF-8") and bad.raw == "\ufffd{}"
    assert decode_jsonl_line(b'"text"').detail == "a JSON str, not an object"  # no line number given


@pytest.mark.parametrize(
    "line, detail",
    [
        (
            b'{"prompt": "\\ud800", "chosen": " a", "rejected": " b"}',
            "line 2: invalid Unicode: a lone surrogate",
        ),
        (b'{"\\udc00": 1}', "line 2: invalid Unicode: a lone surrogate"),  # in a key
        (b'{"a": [[{"b": "x\\uDFFFy"}]]}', "line 2: invalid Unicode: a lone surrogate"),  # nested, upper case
        (b"[" * 100_000 + b"]" * 100_000, "line 2: JSON nested too deeply to read"),
        (b'{"id": ' + b"7" * 5000 + b"}", "line 2: Exceeds the limit (4300 digits)"),  # int_max_str_digits
        (b'{"a": "\xed\xa0\x80"}', "line 2: invalid UTF-8"),  # a surrogate encoded in UTF-8
    ],
)
def test_jsonl_lines_that_are_not_unicode_text_are_undecodable(line: bytes, detail: str):
    """Lone surrogate escapes are JSON syntax but not text (tokenizers reject them); deep nesting and
    huge integers make `json.loads` raise other errors than JSONDecodeError: all are bad rows."""
    bad = decode_jsonl_line(line, 2)
    assert isinstance(bad, UnreadableRow) and bad.reason == "undecodable", bad
    assert bad.detail.startswith(detail) and "\n" not in bad.detail
    assert decode_jsonl_line(b'{"a": "\\ud83d\\ude00 \\\\ud800"}') == {
        "a": "\U0001f600 \\ud800"
    }  # a pair; text


def test_jsonl_lines_split_on_newlines_only_and_drop_a_bom():
    data = b'\xef\xbb\xbf{"a": 1}\n \t\n{"b": "x\xe2\x80\xa8y\rz"}\r\n\n'  # U+2028 and \r inside a line
    assert list(jsonl_lines(io.BytesIO(data))) == [(1, b'{"a": 1}\n'), (3, b'{"b": "x\xe2\x80\xa8y\rz"}\r\n')]


def test_jsonl_reader_streams_the_file(tmp_path: Path):
    """Rows come from the open file line by line: reading a 6 MB file peaks far below its size."""
    import tracemalloc

    path = tmp_path / "big.jsonl"
    row = json.dumps({"prompt": "p" * 3000, "chosen": " a" * 1000, "rejected": " b" * 1000}).encode()
    path.write_bytes((row + b"\n") * 1200)
    assert path.stat().st_size > 6_000_000
    tracemalloc.start()
    try:
        n = sum(1 for _ in iter_rows(str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 1200 and peak < 500_000, peak


def test_empty_sources_name_the_file_and_say_why(tmp_path: Path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    blank = tmp_path / "blank.jsonl"
    blank.write_bytes(b"\n  \n\t\n")
    with pytest.raises(DataError) as e:
        validate_source(DataConfig(source=str(empty)), tmp_path / "q.jsonl")
    assert str(e.value) == f"{empty} has no rows: the file is empty"
    with pytest.raises(DataError) as e:
        validate_source(DataConfig(source=str(blank)), tmp_path / "q.jsonl")
    assert str(e.value) == f"{blank} has no rows: every line of the file is blank"


def test_train_preflight_refuses_empty_small_and_unrenderable_sources(tmp_path: Path):
    """`raydpo train` checks its data on the driver before Ray starts (`pipeline.preflight`), each
    problem one line naming the file and saying why (the CLI prints it and exits 2)."""
    from raydpo.config import build_config
    from raydpo.data.pipeline import preflight

    def cfg(source: Path, **over):
        return build_config({"data": {"source": str(source), **over}, "train": {"batch_size": 8}})

    tok = tiny_tokenizer()
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=f"^{empty} has no rows: the file is empty$"):
        preflight(cfg(empty), tok, str(empty))
    three = write_jsonl(tmp_path / "three.jsonl", GOOD)
    with pytest.raises(DataError) as e:
        preflight(cfg(three), tok, str(three))
    assert str(e.value) == (
        f"{three}: 3 rows, fewer than one global batch of 8 (train.batch_size=8 × scaling.num_workers=1); "
        "add rows or lower train.batch_size"
    )
    ten = write_jsonl(tmp_path / "ten.jsonl", GOOD * 4)
    preflight(cfg(ten), tok, str(ten))
    with pytest.raises(DataError, match=r"4 rows, fewer than one global batch of 8 \(.*, data.max_rows=4\)"):
        preflight(cfg(ten, max_rows=4), tok, str(ten))
    c = cfg(ten, eval_source=str(three))
    preflight(c, tok, str(three))  # an eval source needs rows, not a whole batch
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"x": 1}, CHAT_ROW] * 8)  # the first valid row is chat
    preflight(cfg(chat), tok, str(chat))
    with pytest.raises(DataError, match=f"^{chat}: the data is conversational .* has no chat template"):
        preflight(cfg(chat), tiny_tokenizer(template=None), str(chat))


def test_hf_rows_reach_the_pipeline_with_their_problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A saved HF dataset's bad row is judged like `validate_source` judges it, and a row the
    reader cannot read is carried to the actor stage with its reason, not dropped."""
    import datasets

    from raydpo.data.pipeline import _reader_items

    rows = [
        {"id": "a", "prompt": "Review:", "chosen": " great", "rejected": " bad"},
        {"id": "b", "prompt": "Review:", "chosen": None, "rejected": " bad"},
    ]
    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(hf_dir))
    piped = outcomes(pipeline_rows(_reader_items(iter_rows(str(hf_dir)))))
    assert piped == outcomes(iter_rows(str(hf_dir)))
    assert piped[0] == PreferenceRecord("Review:", " great", " bad", "a")
    assert piped[1][:2] == ("missing_field", "column 'chosen' is null")

    def unreadable():
        yield {"prompt": "p", "chosen": " a", "rejected": " b"}
        yield UnreadableRow("undecodable", "record 1: cannot be read", "<raw bytes>")
        yield BadRow("wrong_type", "record 2: not a mapping")

    monkeypatch.setitem(readers.BUILTINS, "builtin:broken", unreadable)
    items = _reader_items(iter_rows("builtin:broken"))
    assert [it["reason"] for it in items] == ["", "undecodable", "wrong_type"]
    piped = outcomes(pipeline_rows(items))
    assert piped == outcomes(iter_rows("builtin:broken"))
    assert piped[1] == ("undecodable", "record 1: cannot be read", "<raw bytes>")
    assert piped[2] == ("wrong_type", "record 2: not a mapping", None)


# ----------------------------------------------------------------------------- builtin:tiny-qwen


QWEN_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_builtin_tiny_qwen_tokenizes_conversational_pairs_offline():
    """`builtin:tiny-qwen` is a chat model (ChatML): conversational data renders and tokenizes."""
    from raydpo.config import ModelConfig
    from raydpo.data.tokenize import tokenize_pair
    from raydpo.models.loading import load_tokenizer, resolve_model_path
    from raydpo.models.tiny import BUILTIN_MODELS

    assert BUILTIN_MODELS["builtin:tiny-qwen"] == ("qwen", "qwen2")
    tok = load_tokenizer(ModelConfig(policy="builtin:tiny-qwen"))
    config = json.loads((Path(resolve_model_path("builtin:tiny-qwen")) / "config.json").read_text())
    assert config["model_type"] == "qwen2" and tok.bos_token_id is None
    rec = check_row(CHAT_ROW, ColumnsConfig(), chat_renderer(tok))
    assert rec == PreferenceRecord(QWEN_PROMPT, "yes<|im_end|>\n", "no<|im_end|>\n")
    pair = tokenize_pair(rec, tok, 64, 32)
    assert tok.decode(pair.prompt_ids) == QWEN_PROMPT
    assert (
        tok.decode(pair.chosen_ids) == "yes<|im_end|>\n<|endoftext|>"
        and pair.chosen_ids[-1] == tok.eos_token_id
    )
    assert tok.convert_tokens_to_ids("<|im_end|>") in pair.rejected_ids


@pytest.mark.ray
def test_tiny_qwen_pipeline_tokenizes_conversational_pairs(ray_local, tmp_path: Path):
    """What `raydpo train model.policy=builtin:tiny-qwen data.source=<chat jsonl>` prepares: the
    driver's preflight passes, and the Ray Data stage renders and tokenizes every pair exactly as
    `check_row` + `tokenize_pair` do; a string row among them is quarantined as mixed_format.
    (The policy is given as the directory `builtin:tiny-qwen` resolves to, so that Ray's workers,
    started before the per-test RAYDPO_CACHE, use the same cache.)"""
    from raydpo.config import build_config
    from raydpo.data.pipeline import preflight, prepare_dataset
    from raydpo.data.tokenize import tokenize_pair
    from raydpo.models.loading import load_tokenizer, resolve_model_path

    rows = [
        {"id": i, "prompt": [msg("system", "be brief"), msg("user", f"question {i}")],
         "chosen": [msg("assistant", f"yes {i}")], "rejected": [msg("assistant", f"no {i}")]}
        for i in range(8)
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "chat.jsonl", [*rows[:4], GOOD[0], *rows[4:]])
    policy = resolve_model_path("builtin:tiny-qwen")
    cfg = build_config({"model": {"policy": policy}, "train": {"batch_size": 8},
                        "data": {"source": str(path), "max_bad_fraction": 0.2, "max_length": 64,
                                 "max_prompt_length": 32}})  # fmt: skip
    tok = load_tokenizer(cfg.model)
    preflight(cfg, tok, str(path))
    good, report = prepare_dataset(cfg, str(path), tmp_path / "q.jsonl")
    assert (report.total, report.kept, report.counts) == (9, 8, {"mixed_format": 1})
    assert report.format == "conversational" and report.rendered
    assert read_quarantine(tmp_path / "q.jsonl")[0]["row"] == 4
    render = chat_renderer(tok)
    want = {str(r["id"]): tokenize_pair(check_row(r, ColumnsConfig(), render), tok, 64, 32) for r in rows}
    got = {r["id"]: r for r in good.take_all()}
    assert set(got) == set(want)
    for i, pair in want.items():
        assert list(got[i]["prompt_ids"]) == pair.prompt_ids and tok.decode(pair.prompt_ids).endswith(
            "<|im_start|>assistant\n"
        )
        assert (
            list(got[i]["chosen_ids"]) == pair.chosen_ids
            and list(got[i]["rejected_ids"]) == pair.rejected_ids
        )
