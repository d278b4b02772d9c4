"""Log-probabilities of labelled tokens and scalar reward-model scores: the one place they are computed.

Every consumer reads them from here: the DPO-family losses and SFT (`sequence_logps`), PPO's
rollouts and updates and evaluation's KL estimates (`response_logps`), and the reward model in
training, PPO and every judge (`reward_scores`).

Convention: the logits at position t score the token at t + 1. Log-probs are computed in float32
one row at a time (`token_logps`), so no float32 copy of a whole (N, T, V) tensor is made
(TRL's `selective_log_softmax` makes the same trade).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in float32.

    logits (N, T, V), targets (N, T) long (valid ids everywhere) -> (N, T) float32.
    """
    picked = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1).float()  # (N, T)
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in logits])  # (N, T), a row at a time
    return picked - lse


class UnsupportedModel(NotImplementedError):
    """This model or attention backend cannot take a fast path here; the caller falls back to the
    plain one (`sequence_logps` on `data.tokenize.collate`'s rows)."""


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


# --- Compute savers: prefix sharing and response-only logits ------------------------------------
#
# Both give the same numbers as `sequence_logps` on `data.tokenize.collate`'s 2B rows (tests/
# test_prefix_sharing.py holds them to 1e-5 in float32, gradients included) for less compute:
# `shared_prefix_logps` runs each prompt once per pair, `response_only_logps` applies the LM head
# (and the float32 log-softmax) only to the positions that score a response token.

SHARED_PREFIX_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})  # verified by the tests
SHARED_PREFIX_ATTENTION = ("eager", "sdpa")  # the backends that take an arbitrary 4-D mask as given
# config fields of families that transform the logits after the LM head (Gemma 2/3 soft-capping,
# Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier): the head alone
# would give other log-probs, so `response_only_logps` refuses a model that sets one.
# Each field maps to the values that leave the logits unchanged.
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None,),
    "logit_scale": (None, 1.0),
    "logits_scaling": (None, 1.0),
    "lm_head_multiplier": (None, 1.0),
}


def _inner(model):
    """The Hugging Face model under a DDP wrapper (PEFT and FSDP2 models answer attribute lookups)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _config(model):
    config = getattr(_inner(model), "config", None)
    if config is None:
        raise UnsupportedModel(f"{type(model).__name__} has no Hugging Face config")
    return config


def _float_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _shared_prefix_problem(model) -> str | None:
    """Why `model` cannot run `collate_shared`'s layout, or None when it can."""
    config = getattr(_inner(model), "config", None)
    family = getattr(config, "model_type", None)
    if family not in SHARED_PREFIX_FAMILIES:
        return (
            f"prefix sharing is verified for {sorted(SHARED_PREFIX_FAMILIES)}, not {family!r} (the model "
            "must take a 4-D attention mask as given and take its positions from position_ids)"
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SHARED_PREFIX_ATTENTION:
        return (
            f"prefix sharing needs attn_implementation in {SHARED_PREFIX_ATTENTION}, not {impl!r} "
            "(flash attention takes no arbitrary mask; flex attention would need a BlockMask)"
        )
    return None


def supports_shared_prefix(model) -> bool:
    """Whether `shared_prefix_logps` can run this model (family and attention backend)."""
    return _shared_prefix_problem(model) is None


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if "sliding_attention" in types else None
    return window if getattr(config, "use_sliding_window", True) else None


def _attention_bias(mask4: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """What the backend expects, as Hugging Face builds it: bool for SDPA, additive float for eager."""
    if impl == "sdpa":
        return mask4
    bias = torch.zeros(mask4.shape, dtype=dtype, device=mask4.device)
    return bias.masked_fill(~mask4, torch.finfo(dtype).min)


def _check_head(model):
    """The LM head module; raises UnsupportedModel when the head alone would not give the logits."""
    config = _config(model)
    for cfg in (config, getattr(config, "text_config", None)):
        for name, neutral in LOGIT_TRANSFORMS.items():
            value = getattr(cfg, name, None)
            if value not in neutral:  # e.g. Granite's default logits_scaling is 1.0
                raise UnsupportedModel(
                    f"{config.model_type}: config.{name}={value} transforms the logits after the LM head; "
                    "response-only log-probs would differ (use sequence_logps)"
                )
    head = _inner(model).get_output_embeddings()
    if head is None:
        name = type(_inner(model)).__name__
        raise UnsupportedModel(f"{name} exposes no LM head (get_output_embeddings)")
    return head


def _head_inputs(model, head, **inputs) -> torch.Tensor:
    """(N, T, H) hidden states the LM head would see, from one forward pass of `model` itself.

    The whole model runs (not only its backbone), so DDP's and FSDP2's forward hooks and PEFT's
    wrappers run as in training; a pre-hook on the head keeps its input and hands it zero rows, so
    no logits are computed there.
    """
    seen = []

    def grab(module, args):
        seen.append(args[0])
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(grab)
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise UnsupportedModel(f"the LM head ran {len(seen)} times in one forward pass (expected once)")
    return seen[0]


def _chunk_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)  # (c, V) in the model's dtype
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)  # (c,) float32, as token_logps


def _head_logps(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """(M,) float32 log-probs of `targets` (M,) from `hidden` (M, H), `chunk` rows at a time.

    With gradients on and more than one chunk, each chunk is recomputed in backward (activation
    checkpointing), so only its (chunk, H) input is kept: at most one (chunk, V) float32 block of
    logits exists at a time. When the M rows fit in one chunk, that one block is kept for backward
    instead: it exists during the forward either way, so the peak is the same, and backward does not
    run the head a second time (4-7% of a step of `raydpo bench`'s model).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    trained = hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    grad = torch.is_grad_enabled() and trained and hidden.shape[0] > chunk
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        args = (head, hidden[start : start + chunk], targets[start : start + chunk])
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if grad else _chunk_logps(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _sequence(total: torch.Tensor, n: torch.Tensor) -> SequenceLogps:
    return SequenceLogps(total, total / n.clamp(min=1), n)


def response_only_logps(model, input_ids, attention_mask, labels, chunk: int = 1024) -> SequenceLogps:
    """`sequence_logps` with the LM head applied only where a labelled token is scored.

    Same inputs and result as `sequence_logps` ((N, T) right-padded rows, labels not shifted;
    (N,) sums, means and counts). The hidden states at positions t whose token t + 1 is labelled,
    M rows in all, go through the LM head `chunk` rows at a time, so neither the (N, T, V) logits
    nor a float32 (M, V) tensor is built. Differentiable. Raises UnsupportedModel for a model
    that transforms its logits after the head (see LOGIT_TRANSFORMS) or exposes no head.
    """
    head = _check_head(model)
    hidden = _head_inputs(model, head, input_ids=input_ids, attention_mask=attention_mask)  # (N, T, H)
    targets = labels[:, 1:]  # (N, T-1): position t scores the token at t + 1
    mask = targets != IGNORE_INDEX
    rows, cols = mask.nonzero(as_tuple=True)  # (M,) each
    logps = _head_logps(head, hidden[rows, cols], targets[rows, cols], chunk)  # (M,)
    total = torch.zeros(mask.shape[0], dtype=torch.float32, device=logps.device).index_add(0, rows, logps)
    return _sequence(total, mask.sum(-1))


def shared_prefix_logps(model, batch: dict, response_only: bool = False,
                        chunk: int = 1024) -> tuple[SequenceLogps, SequenceLogps]:  # fmt: skip
    """(chosen, rejected) log-probs, each (B,), from one forward pass over `collate_shared`'s rows
    (B of them, or fewer when packed: `pair_row` names each pair's).

    Equal to `sequence_logps` on `collate`'s 2B rows of the same pairs (first B: chosen, last B:
    rejected). With `response_only`, the LM head runs only on the scored rows, as in
    `response_only_logps`. Raises UnsupportedModel when `supports_shared_prefix(model)` is
    False, or when a sliding-window model would see a sequence longer than its window (its
    window is not part of the 4-D mask).
    """
    problem = _shared_prefix_problem(model)
    if problem:
        raise UnsupportedModel(problem)
    config = _config(model)
    window = _sliding_window(config)
    longest = int(batch["position_ids"].max()) + 1 if window is not None else 0  # no host sync without one
    if window is not None and longest > window:
        raise UnsupportedModel(f"a sequence of {longest} tokens exceeds the sliding window ({window})")
    bias = _attention_bias(batch["attention_mask_4d"], config._attn_implementation, _float_dtype(model))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": bias, "position_ids": batch["position_ids"]}
    keys = ("chosen", "rejected")
    n_pairs = batch["chosen_mask"].shape[0]
    pair_row = batch.get("pair_row")  # (B,): the row holding each pair (packed rows hold several)
    if pair_row is None:
        pair_row = torch.arange(n_pairs, device=batch["input_ids"].device)
    if not response_only:
        logits = model(**inputs, use_cache=False).logits  # (N, T, V)
        rows = pair_row.unsqueeze(-1)  # (B, 1)
        out = []
        for k in keys:
            mask = batch[f"{k}_mask"]  # (B, R)
            logps = token_logps(logits[rows, batch[f"{k}_src"]], batch[f"{k}_tgt"]) * mask  # (B, R)
            out.append(_sequence(logps.sum(-1), mask.sum(-1)))
        return out[0], out[1]
    head = _check_head(model)
    hidden = _head_inputs(model, head, **inputs)  # (N, T, H)
    sel = [batch[f"{k}_mask"].nonzero(as_tuple=True) for k in keys]  # (pair, j) per response token
    picked = torch.cat(
        [hidden[pair_row[i], batch[f"{k}_src"][i, j]] for k, (i, j) in zip(keys, sel)]
    )  # (Mc + Mr, H)
    targets = torch.cat([batch[f"{k}_tgt"][i, j] for k, (i, j) in zip(keys, sel)])
    logps = _head_logps(head, picked, targets, chunk).split([len(i) for i, _ in sel])
    out = []
    for k, (i, _), lp in zip(keys, sel, logps):
        total = torch.zeros(n_pairs, dtype=torch.float32, device=lp.device).index_add(0, i, lp)
        out.append(_sequence(total, batch[f"{k}_mask"].sum(-1)))
    return out[0], out[1]


_said: set[str] = set()


def _say_once(message: str) -> None:
    """One line on stderr per distinct fallback and process (every step would hit it again)."""
    if message not in _said:
        _said.add(message)
        print(f"raydpo: {message}", file=sys.stderr, flush=True)


def pair_logps(model, batch: dict, response_only: bool = False) -> SequenceLogps:
    """(2B,) log-probs of a batch of B pairs, chosen then rejected, from either batch layout.

    `batch` is `data.tokenize.collate`'s 2B rows, or `collate_shared`'s B rows (it has `chosen_src`;
    one forward pass with the prompt computed once). `response_only` runs the LM head on scored
    positions only; a model whose logits it cannot reproduce (see `_check_head`) falls back to the
    full logits, said once on stderr.
    """
    if response_only:
        try:
            _check_head(model)
        except UnsupportedModel as e:
            _say_once(f"logits on every position: {e}")
            response_only = False
    if "chosen_src" in batch:
        c, r = shared_prefix_logps(model, batch, response_only=response_only)
        return SequenceLogps(*(torch.cat([a, b]) for a, b in zip(c, r)))
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    return response_only_logps(model, *args) if response_only else sequence_logps(model, *args)


def shared_prefix_fallback(models, max_length: int) -> str | None:
    """Why these models (policy, and reference where there is one) cannot share prompts on sequences
    of up to `max_length` tokens, or None when they can."""
    for m in models:
        if m is None:
            continue
        if why := _shared_prefix_problem(m):
            return why
        window = _sliding_window(_config(m))
        if window is not None and window < max_length:
            return f"the sliding window ({window}) is shorter than data.max_length ({max_length})"
    return None
