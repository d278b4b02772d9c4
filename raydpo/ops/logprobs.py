"""Log-probabilities of labelled tokens and scalar reward-model scores: the one place they are computed.

Every consumer reads them from here: the DPO-family losses and SFT (`sequence_logps`), PPO's
rollouts and updates and evaluation's KL estimates (`response_logps`), and the reward model in
training, PPO and every judge (`reward_scores`).

Convention: the logits at position t score the token at t + 1. Log-probs are computed in float32
one row at a time (`token_logps`), so no float32 copy of a whole (N, T, V) tensor is made
(TRL's `selective_log_softmax` makes the same trade).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in float32.

    logits (N, T, V), targets (N, T) long (valid ids everywhere) -> (N, T) float32.
    """
    picked = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1).float()  # (N, T)
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # (N, T), a row at a time
    return picked - lse


class SequenceLogps(NamedTuple):
    """Per-sequence log-probs of the labelled tokens, each (N,)."""

    sum: torch.Tensor  # Σ_t log π(y_t | x, y_<t) over response tokens
    mean: torch.Tensor  # sum / n_tokens
    n_tokens: torch.Tensor  # number of response tokens


def sequence_logps(model, input_ids, attention_mask, labels) -> SequenceLogps:
    """One forward pass; log-probs of the labelled tokens, summed and averaged per sequence.

    input_ids, attention_mask, labels: (N, T), right-padded; labels IGNORE_INDEX where not scored
    (prompt and padding), the token id elsewhere (not shifted).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)
    targets = labels[:, 1:]  # (N, T-1): the logit at t scores the token at t + 1
    mask = targets != IGNORE_INDEX
    logps = token_logps(logits[:, :-1], targets.masked_fill(~mask, 0)) * mask  # (N, T-1)
    n = mask.sum(-1)
    total = logps.sum(-1)
    return SequenceLogps(total, total / n.clamp(min=1), n)


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) position ids that start at 0 on each row's first real token (as `generate` uses them)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logps(logits: torch.Tensor, full_ids: torch.Tensor, query_len: int,
                   temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """(B, Tr) log-probs of each response token of [query (Tq); response (Tr)] rows.

    logits (B, Tq + Tr, V) over those rows. `temperature` divides the logits first, so the result is
    the log-prob under the distribution the tokens were *sampled* from (PPO's ratio and KL must use
    it: a policy sampled at T has π_T(y) ∝ exp(logit / T)). Temperature 0 (greedy) is scored at 1.
    """
    logits = logits[:, query_len - 1 : -1]  # (B, Tr, V): the logit at t scores the token at t + 1
    if temperature not in (0, 1):
        logits = logits / temperature
    return token_logps(logits, full_ids[:, query_len:])


@torch.no_grad()
def rollout_logps(model, full_ids, full_mask, query_len: int, temperature: float = 1.0) -> torch.Tensor:
    """(B, Tr) response log-probs under a causal LM of left-padded query + right-padded response rows."""
    logits = model(input_ids=full_ids, attention_mask=full_mask,
                   position_ids=left_padded_positions(full_mask), use_cache=False).logits  # fmt: skip
    return response_logps(logits, full_ids, query_len, temperature)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) index of each row's last attended position; works for left or right padding."""
    t = attention_mask.shape[1]
    return t - 1 - attention_mask.flip(1).long().argmax(dim=1)


def reward_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """(N,) scalar rewards of a sequence-classification model, read at each row's last real token.

    The reward model is trained on prompt + response + EOS rows (data.tokenize), so the last real
    token is the EOS; `models.scoring.score_texts` builds the same rows from text at inference.
    """
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask
    ).last_hidden_state  # (N, T, H)
    idx = last_token_index(attention_mask)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (N, H)
    return model.score(last).squeeze(-1).float()
