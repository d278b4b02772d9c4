"""Sampling completions from a causal LM: texts for tasks and evaluation, token tensors for PPO.

One batched core (`_sample_batch`) serves both: prompts are left-padded so every row's last
prompt token sits in the last column and generation continues from it; responses come back
right-padded with a mask that stops after the first EOS.

Seeding: HF `generate` accepts no torch.Generator, so each batch calls `torch.manual_seed(seed + b)`
(b = batch index) inside `torch.random.fork_rng`, which leaves the caller's global RNG untouched.
Same (model, prompts, seed, batch_size) → same samples; a different batch_size regroups rows and so
changes them.

Sampling is pure temperature sampling unless `top_k` is given: top_k=None is passed to HF as 0
(HF otherwise falls back to top_k=50) and top_p / repetition_penalty are pinned to 1.0, so a model's
saved generation_config cannot change the distribution (PPO's log-probs must match it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from raydpo.data.tokenize import pad_token_id


class Rollout(NamedTuple):
    """Sampled responses as tensors (on the model's device), row b = prompt b."""

    query_ids: torch.Tensor  # (B, Tq) long, left-padded with the pad id
    query_mask: torch.Tensor  # (B, Tq) long, 1 on prompt tokens
    response_ids: torch.Tensor  # (B, Tr) long, right-padded with the pad id after the first EOS
    response_mask: torch.Tensor  # (B, Tr) long, 1 up to and including the first EOS, 0 after
    texts: list[str]  # decoded responses, cut at the first EOS, special tokens skipped


def _left_pad(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize with special tokens (BOS where the tokenizer adds one) and left-pad by hand.

    Padding by hand leaves the tokenizer's `padding_side` alone and works for tokenizers without a
    pad token. Returns ids and mask, both (B, Tq) long.
    """
    seqs = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    for i, s in enumerate(seqs):
        if not s:  # an empty prompt under a no-BOS tokenizer: start from BOS as GPT-2 does
            if tokenizer.bos_token_id is None:
                raise ValueError(f"prompt {i} is empty and the tokenizer has no BOS token to start from")
            seqs[i] = [tokenizer.bos_token_id]
    width = max(len(s) for s in seqs)
    pid = pad_token_id(tokenizer)
    ids = torch.tensor([[pid] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor(
        [[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device
    )
    return ids, mask


def mask_after_eos(response_ids: torch.Tensor, eos_id: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (B, Tr) that is 1 up to and including the first EOS of each row, and ids with pad after.

    `cumsum(is_eos) - is_eos` counts the EOS tokens strictly before each position, so it is 0 exactly
    up to and including the first EOS (this also handles pad == EOS, as in GPT-2 style tokenizers).
    """
    is_eos = (response_ids == eos_id).long()  # (B, Tr)
    mask = ((is_eos.cumsum(-1) - is_eos) == 0).long()  # (B, Tr)
    return response_ids.masked_fill(mask == 0, pad), mask


@torch.no_grad()
def _sample_batch(model, tokenizer, prompts, *, max_new_tokens, temperature, top_k, seed) -> Rollout:
    """Sample one response per prompt in a single `model.generate` call (model already in eval)."""
    if not prompts:
        raise ValueError("no prompts to sample from")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    device = next(model.parameters()).device
    query_ids, query_mask = _left_pad(tokenizer, prompts, device)
    pad, eos = pad_token_id(tokenizer), tokenizer.eos_token_id
    kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos, do_sample=temperature > 0)
    if temperature > 0:  # greedy gets no sampling knobs: HF warns when they are set with do_sample=False
        kw.update(temperature=temperature, top_k=top_k or 0, top_p=1.0, repetition_penalty=1.0)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        out = model.generate(input_ids=query_ids, attention_mask=query_mask, **kw)  # (B, Tq + Tr)
    response = out[:, query_ids.shape[1] :]  # (B, Tr), Tr ≤ max_new_tokens (HF stops when all hit EOS)
    if eos is None:  # nothing to cut at: every generated token counts
        response_ids, response_mask = response, torch.ones_like(response)
    else:
        response_ids, response_mask = mask_after_eos(response, eos, pad)
    # Decode only the kept tokens; skip_special_tokens drops the EOS itself from the text.
    texts = [
        tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
        for row, m in zip(response_ids.cpu(), response_mask.cpu())
    ]
    return Rollout(query_ids, query_mask, response_ids, response_mask, texts)


class _EvalMode:
    """Context manager: model.eval() inside, the previous train/eval mode restored on exit."""

    def __init__(self, model) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()  # dropout off while sampling

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    n: int = 1,
    max_new_tokens: int = 24,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """`n` sampled completions per prompt, in prompt order: out[i][j] is sample j of prompts[i].

    Completions are the decoded new tokens only, cut at the first EOS. The flat list of
    len(prompts) * n rows (each prompt repeated n times, consecutively) is generated in batches of
    `batch_size`, batch b seeded with `seed + b`. temperature == 0 is greedy decoding.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
    flat = [p for p in prompts for _ in range(n)]
    texts: list[str] = []
    with _EvalMode(model):
        for b, start in enumerate(range(0, len(flat), batch_size)):
            chunk = flat[start : start + batch_size]
            texts += _sample_batch(
                model, tokenizer, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, seed=seed + b,
            ).texts  # fmt: skip
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 24,
    temperature: float = 1.0,
    seed: int = 0,
    *,
    top_k: int | None = None,
) -> Rollout:
    """One sampled response per prompt, as tensors for PPO (see `Rollout` for shapes).

    All prompts go in one batch seeded with `seed`, so `rollout.texts[i]` equals
    `generate(..., n=1, seed=seed, batch_size >= len(prompts))[i][0]`.
    """
    with _EvalMode(model):
        return _sample_batch(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            seed=seed,
        )  # fmt: skip
