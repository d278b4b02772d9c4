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
from typing import Literal

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


def pack_rows(lengths: list[int], capacity: int, groups: int = 1) -> list[list[int]]:
    """Rows of item indices, first-fit decreasing: each row's lengths sum to at most `capacity` (an
    item longer than that gets a row of its own). With `groups`, the items split into that many equal
    consecutive groups (gradient-accumulation micro-batches) and no row mixes two; the rows of group g
    come before those of g + 1. Deterministic: ties keep the items' order."""
    n = len(lengths)
    if groups < 1 or n % groups:
        raise ValueError(f"{n} items do not split into {groups} equal groups")
    size, rows = n // groups, []
    for g in range(groups):
        ids = sorted(range(g * size, (g + 1) * size), key=lambda i: -lengths[i])
        mine: list[list[int]] = []
        room: list[int] = []
        for i in ids:
            r = next((r for r, left in enumerate(room) if lengths[i] <= left), None)
            if r is None:
                mine.append([i])
                room.append(capacity - lengths[i])
            else:
                mine[r].append(i)
                room[r] -= lengths[i]
        rows += [sorted(r) for r in mine]
    return rows


def collate_shared(
    pairs: list[TokenizedPair], pad_id: int, pad_to_multiple_of: int | None = None, pack: bool = False,
    groups: int = 1,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Prefix sharing: one right-padded row `[prompt; chosen; rejected]` per pair, so the prompt runs once.

    With p, c, r the lengths of one pair's prompt, chosen and rejected ids, its row holds p + c + r
    real tokens (`collate`'s two rows hold 2p + c + r). Under `attention_mask_4d` and
    `position_ids` each response is computed exactly as in its own `prompt; response` row:

    - `position_ids`: 0 … p + c - 1 on prompt and chosen, then p … p + r - 1 on rejected (as if the
      rejected tokens followed the prompt directly); 0 on padding.
    - `attention_mask_4d`: token q may attend to k iff both are real, k <= q, and not (q rejected,
      k chosen). No real token attends to padding; a padding token attends only to itself, so no
      row of the mask is empty (an all-masked row gives NaN in some SDPA kernels, and a NaN in the
      padding's hidden states would poison parameter gradients).

    The logits at position t score the token the row's *logical* sequence continues with, which
    for the first rejected token is the prompt's last position (p - 1), not the last chosen token:
    a shift of the labels cannot express that, hence the index tensors `*_src` / `*_tgt`.

    Returns (B pairs, T = padded row width, R = the longest response in the batch):

        input_ids          (B, T) long   pad_id on padding
        attention_mask     (B, T) long   1 on real tokens (the count of computed tokens)
        position_ids       (B, T) long
        attention_mask_4d  (B, 1, T, T) bool, True where query may attend to key
        chosen_labels      (B, T) long   the token id on chosen positions, -100 elsewhere (not shifted)
        rejected_labels    (B, T) long   the same for rejected positions
        chosen_src         (B, R) long   position whose logits predict chosen token j: p - 1 + j; 0 past c
        chosen_tgt         (B, R) long   chosen token j; pad_id past c
        chosen_mask        (B, R) bool   j < c
        rejected_src       (B, R) long   p - 1 for j = 0, p + c + j - 1 for j >= 1; 0 past r
        rejected_tgt       (B, R) long   rejected token j; pad_id past r
        rejected_mask      (B, R) bool   j < r
        pair_row           (B,)   long   the row that holds each pair (here: its own, 0 … B - 1)

    Packing (`pack`, `train.packing`): several pairs share a row, each a segment `[prompt; chosen;
    rejected]` with its own positions (restarting at 0) and a block-diagonal mask (no token sees
    another pair's), so the rows hold less padding. The row width stays the longest pair's (`pack_rows`
    with that capacity): no attention row gets longer than unpacked. Then the row tensors have N <= B
    rows, `pair_row` says which, and `*_src` index positions within that row. With `groups`, the
    pairs of each of that many consecutive micro-batches are packed apart (`engine.step.split_batch`).

    `ops.logprobs.shared_prefix_logps` consumes this. Every prompt must be non-empty (nothing
    would predict the first response token).
    """
    if any(not p.prompt_ids for p in pairs):
        raise ValueError("collate_shared needs a non-empty prompt in every pair")
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    totals = [a + b + c for a, b, c in lengths]
    n = len(pairs)
    rows = pack_rows(totals, max(totals), groups) if pack else [[i] for i in range(n)]
    width = max(sum(totals[i] for i in row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    resp = max(max(c, r) for _, c, r in lengths)
    m = len(rows)
    input_ids = torch.full((m, width), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((m, width), dtype=torch.long)  # (N, T)
    position_ids = torch.zeros((m, width), dtype=torch.long)  # (N, T)
    mask4 = torch.zeros((m, 1, width, width), dtype=torch.bool)  # (N, 1, T, T)
    labels = {k: torch.full((m, width), IGNORE_INDEX, dtype=torch.long) for k in ("chosen", "rejected")}
    src = {k: torch.zeros((n, resp), dtype=torch.long) for k in ("chosen", "rejected")}  # (B, R)
    tgt = {k: torch.full((n, resp), pad_id, dtype=torch.long) for k in ("chosen", "rejected")}
    valid = {k: torch.zeros((n, resp), dtype=torch.bool) for k in ("chosen", "rejected")}
    pair_row = torch.zeros(n, dtype=torch.long)  # (B,)
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # (T, T)
    for row, members in enumerate(rows):
        o = 0  # the segment's offset in the row
        for i in members:
            pair, (p, c, r), total = pairs[i], lengths[i], totals[i]
            seg = slice(o, o + total)
            input_ids[row, seg] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids)
            attention_mask[row, seg] = 1
            position_ids[row, o : o + p + c] = torch.arange(p + c)
            position_ids[row, o + p + c : o + total] = torch.arange(p, p + r)
            block = causal[:total, :total].clone()
            block[p + c :, p : p + c] = False  # rejected never sees chosen
            mask4[row, 0, seg, seg] = block
            labels["chosen"][row, o + p : o + p + c] = input_ids[row, o + p : o + p + c]
            labels["rejected"][row, o + p + c : o + total] = input_ids[row, o + p + c : o + total]
            src["chosen"][i, :c] = torch.arange(o + p - 1, o + p - 1 + c)
            rejected_src = [o + p - 1] + list(range(o + p + c, o + total - 1))
            src["rejected"][i, :r] = torch.tensor(rejected_src[:r], dtype=torch.long)
            tgt["chosen"][i, :c] = torch.tensor(pair.chosen_ids)
            tgt["rejected"][i, :r] = torch.tensor(pair.rejected_ids)
            valid["chosen"][i, :c] = True
            valid["rejected"][i, :r] = True
            pair_row[i] = row
            o += total
        pad = torch.arange(o, width)
        mask4[row, 0, pad, pad] = True  # padding sees only itself
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
           "attention_mask_4d": mask4, "pair_row": pair_row}  # fmt: skip
    for k in ("chosen", "rejected"):
        out |= {f"{k}_labels": labels[k], f"{k}_src": src[k], f"{k}_tgt": tgt[k], f"{k}_mask": valid[k]}
    return out


Layout = Literal["pairs", "texts", "shared", "packed"]


def collate_batch(
    pairs: list[TokenizedPair], pad_id: int, layout: Layout, groups: int = 1
) -> dict[str, torch.Tensor]:
    """The engine's one collate: `pairs` → `collate`'s 2B rows, `texts` → its B chosen rows, `shared`
    → `collate_shared`'s B rows, `packed` → `collate_shared`'s packed rows (`groups`: the micro-batches
    of gradient accumulation, packed apart). A `shared` or `packed` batch holding a pair with an empty
    prompt (nothing would predict its first response token) is collated as `pairs` instead; consumers
    tell the layouts apart by the `chosen_src` key."""
    if layout in ("shared", "packed") and all(p.prompt_ids for p in pairs):
        return collate_shared(pairs, pad_id, pack=layout == "packed", groups=groups)
    return collate(pairs, pad_id, chosen_only=layout == "texts")
