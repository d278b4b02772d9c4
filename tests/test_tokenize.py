"""Exact token layouts for Llama-, GPT-2- and Qwen-style tokenizers built in the test."""

import pytest

from raydpo.data.schema import BadRow, PreferenceRecord
from raydpo.data.tokenize import IGNORE_INDEX, collate, tokenize_pair
from raydpo.models.tiny import build_tokenizer

REC = PreferenceRecord(prompt="Review of Heat:", chosen=" great film", rejected=" dull", id="r1")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def toks():
    return {s: build_tokenizer(s) for s in ("llama", "gpt2", "qwen")}


def test_llama_style_bos_and_eos(toks):
    tok = toks["llama"]
    p = tokenize_pair(REC, tok, 64, 32)
    assert p.prompt_ids == [tok.bos_token_id] + ids(tok, "Review of Heat:")
    assert p.chosen_ids == ids(tok, " great film") + [tok.eos_token_id]
    assert p.rejected_ids == ids(tok, " dull") + [tok.eos_token_id]
    assert p.id == "r1"


@pytest.mark.parametrize("style", ["gpt2", "qwen"])
def test_no_bos_styles(toks, style):
    tok = toks[style]
    p = tokenize_pair(REC, tok, 64, 32)
    assert p.prompt_ids == ids(tok, "Review of Heat:")  # GPT-2 and Qwen add no BOS
    assert p.chosen_ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


def test_eos_not_doubled_when_text_ends_with_it(toks):
    tok = toks["qwen"]
    rec = PreferenceRecord("Q:", " yes<|endoftext|>", " no")
    p = tokenize_pair(rec, tok, 64, 32)
    assert p.chosen_ids.count(tok.eos_token_id) == 1 and p.chosen_ids[-1] == tok.eos_token_id


def test_truncation_keeps_prompt_end_with_bos_and_response_start(toks):
    """Prompt of 1 BOS + n tokens cut to 4: BOS + its last 3 tokens; responses cut to max_length - 4."""
    tok = toks["llama"]
    rec = PreferenceRecord("one two three four five six", " alpha beta gamma delta epsilon", " zeta")
    full_prompt = [tok.bos_token_id] + ids(tok, "one two three four five six")
    full_chosen = ids(tok, " alpha beta gamma delta epsilon") + [tok.eos_token_id]
    p = tokenize_pair(rec, tok, max_length=7, max_prompt_length=4)
    assert p.prompt_ids == [tok.bos_token_id] + full_prompt[-3:]
    assert p.chosen_ids == full_chosen[:3]  # 7 - 4 = 3 tokens of room; EOS is cut with the tail
    assert len(p.prompt_ids) + len(p.chosen_ids) == 7
    assert p.rejected_ids == (ids(tok, " zeta") + [tok.eos_token_id])[:3]


def test_truncation_without_bos_keeps_end(toks):
    tok = toks["gpt2"]
    full = ids(tok, "one two three four five six")
    p = tokenize_pair(PreferenceRecord("one two three four five six", " a", " b"), tok, 8, 2)
    assert p.prompt_ids == full[-2:]


def test_identical_after_truncation_is_bad_row(toks):
    tok = toks["gpt2"]
    rec = PreferenceRecord("Q:", " same start then x", " same start then y")
    with pytest.raises(BadRow) as e:
        tokenize_pair(rec, tok, max_length=3, max_prompt_length=1)
    assert e.value.reason == "identical"


def test_collate_layout(toks):
    """Two pairs → 4 rows (chosen, chosen, rejected, rejected), right-padded, labels only on responses."""
    from raydpo.data.tokenize import TokenizedPair

    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6]), TokenizedPair([7, 8], [9], [10, 11])]
    b = collate(pairs, pad_id=0)
    I = IGNORE_INDEX  # noqa: E741
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert b["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
    ]
    assert b["labels"].tolist() == [[I, I, I, 4, 5], [I, I, 9, I, I], [I, I, I, 6, I], [I, I, 10, 11, I]]
    assert collate(pairs, pad_id=0, pad_to_multiple_of=4)["input_ids"].shape == (4, 8)
