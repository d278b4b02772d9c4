"""Reward-model scores of (prompt, response) texts: the one scorer for PPO, Best-of-N and the judges.

A reward model (method=reward_model) is trained on rows built by `data.tokenize` — the prompt with
the tokenizer's special tokens, the response without, then EOS — and reads its score at the last
real token (`ops.logprobs.reward_scores`). `score_texts` builds exactly those rows from text, so a
pair scored at inference gets its training-time score (tests/test_scoring.py holds this to 1e-6).
"""

from __future__ import annotations

import torch

from raydpo.data.tokenize import collate, pad_token_id, tokenize_text
from raydpo.ops.logprobs import reward_scores

MAX_TOKENS = 1 << 20  # no truncation at inference: whole prompt + response


@torch.no_grad()
def score_texts(
    model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 64
) -> list[float]:
    """Reward-model scores, one per (prompt, response), in batches of `batch_size` (right-padded)."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        rows = [tokenize_text(p, r, tokenizer, MAX_TOKENS, MAX_TOKENS - 1)
                for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size])]  # fmt: skip
        batch = collate(rows, pad_token_id(tokenizer), chosen_only=True)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out += reward_scores(model, ids, mask).tolist()
    return out
