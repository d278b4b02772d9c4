"""Tokenization and collation of preference pairs: pure functions of records and a tokenizer.

Layout of one pair (the same as TRL's DPOTrainer for standard data):

    prompt_ids   = [BOS if the tokenizer adds one] + tokens(prompt)      tokenized once per pair
    chosen_ids   = tokens(chosen)   + [EOS]                              the response alone
    rejected_ids = tokens(rejected) + [EOS]

A sequence is prompt_ids + response_ids. EOS is not added when the response text already ends with
the EOS token (chat templates often close the turn with it). Truncation keeps the *end* of a long
prompt (BOS stays first) to `max_prompt_length`, then the *start* of each response so that
prompt + response fits `max_length`. Labels are -100 on prompt and padding, so only response
tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raydpo.data.schema import BadRow, PreferenceRecord

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair; responses exclude the prompt."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    id: str | None = None


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _response_ids(tokenizer, text: str) -> list[int]:
    ids = _encode(tokenizer, text, special=False)
    eos = tokenizer.eos_token
    if not text.rstrip().endswith(eos):
        ids.append(tokenizer.eos_token_id)
    return ids


def _truncate_prompt(ids: list[int], limit: int, bos_id: int | None) -> list[int]:
    if len(ids) <= limit:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:  # keep BOS, then the prompt's end
        return [bos_id] + ids[len(ids) - limit + 1 :]
    return ids[len(ids) - limit :]


def tokenize_pair(
    record: PreferenceRecord, tokenizer, max_length: int, max_prompt_length: int
) -> TokenizedPair:
    """Tokenize one record.

    Raises BadRow("empty_after_truncation") when the prompt or a response has no tokens left, and
    BadRow("identical") when truncation makes the two responses the same.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
    prompt = _truncate_prompt(
        _encode(tokenizer, record.prompt, special=True), max_prompt_length, tokenizer.bos_token_id
    )
    room = max_length - len(prompt)
    chosen = _response_ids(tokenizer, record.chosen)[:room]
    rejected = _response_ids(tokenizer, record.rejected)[:room]
    if not prompt or not chosen or not rejected:
        which = "prompt" if not prompt else "chosen" if not chosen else "rejected"
        raise BadRow("empty_after_truncation", f"{which} has no tokens after tokenization/truncation")
    if chosen == rejected:
        raise BadRow("identical", "chosen and rejected are the same tokens after truncation")
    return TokenizedPair(prompt, chosen, rejected, record.id)


def tokenize_text(
    prompt: str, completion: str, tokenizer, max_length: int, max_prompt_length: int
) -> TokenizedPair:
    """An SFT example: prompt (may be empty: then only BOS, if any) → completion + EOS, same truncation
    rules as pairs. Stored as a TokenizedPair without a rejected response."""
    ids = _encode(tokenizer, prompt, special=True)
    p = _truncate_prompt(ids, max_prompt_length, tokenizer.bos_token_id)
    c = _response_ids(tokenizer, completion)[: max_length - len(p)]
    if not c:
        raise BadRow("empty_after_truncation", "the completion has no tokens after tokenization/truncation")
    return TokenizedPair(p, c, [])


def collate(
    pairs: list[TokenizedPair], pad_id: int, pad_to_multiple_of: int | None = None, chosen_only: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones.

    Returns input_ids (2B, T), attention_mask (2B, T) and labels (2B, T) holding the token id on
    response positions and -100 elsewhere. Labels are not shifted: the token at t is scored from
    the logits at t-1 (see ops.logprobs.sequence_logps).
    """
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs]
    if not chosen_only:  # `chosen_only`: B rows (SFT, Preferred-FT) instead of 2B
        seqs += [p.prompt_ids + p.rejected_ids for p in pairs]
    starts = [len(p.prompt_ids) for p in pairs] * (1 if chosen_only else 2)
    width = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (2B, T)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)  # (2B, T)
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        row = torch.tensor(seq, dtype=torch.long)
        input_ids[i, : len(seq)] = row
        attention_mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = row[start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS (masked out either way; GPT-2 style
    tokenizers have no pad token)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return pid
