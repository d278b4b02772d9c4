"""The unlikelihood baseline (methods/unlikelihood.py): its loss by hand, its gradient signs, its
wiring on a model's 2B rows, and a short training run through the engine's loop."""

import math

import pytest
import torch

from raydpo.config import build_config
from raydpo.data.builtin import tiny_prefs
from raydpo.data.schema import PreferenceRecord
from raydpo.data.tokenize import collate, pad_token_id, tokenize_pair
from raydpo.engine.local import train_local
from raydpo.methods import METHODS
from raydpo.methods.supervised import PREFERRED_FT
from raydpo.methods.unlikelihood import UNLIKELIHOOD, compute_loss, unlikelihood_loss
from raydpo.models.loading import load_policy, load_tokenizer
from raydpo.ops.logprobs import sequence_logps, token_logps


def _lp(*probs):
    return torch.tensor([math.log(p) for p in probs])


def test_loss_by_hand():
    """Two pairs; chosen token probabilities (0.5, 0.25) and (1.0), rejected (0.5, 0.9) and (0.2); a
    padded position (masked) holds 0.99 and must not count. Means over the batch's tokens:

        likelihood   = −(ln 0.5 + ln 0.25 + ln 1) / 3 = 3 ln 2 / 3 = ln 2 = 0.693147
        unlikelihood = −(ln 0.5 + ln 0.1 + ln 0.8) / 3 = ln(2 · 10 · 1.25) / 3 = ln 25 / 3 = 1.072959
        loss (α = 0.5) = 0.693147 + 0.5 · 1.072959 = 1.229626
    """
    chosen = torch.stack([_lp(0.5, 0.25, 0.99), _lp(1.0, 0.99, 0.99)])
    chosen_mask = torch.tensor([[True, True, False], [True, False, False]])
    rejected = torch.stack([_lp(0.5, 0.9, 0.99), _lp(0.2, 0.99, 0.99)])
    rejected_mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, m = unlikelihood_loss(chosen, chosen_mask, rejected, rejected_mask, alpha=0.5)
    assert m["loss/likelihood"].item() == pytest.approx(0.693147, abs=1e-6)
    assert m["loss/unlikelihood"].item() == pytest.approx(1.072959, abs=1e-6)
    assert loss.item() == pytest.approx(1.229626, abs=1e-6)
    assert m["logps/chosen"].item() == pytest.approx((math.log(0.125) + 0.0) / 2, abs=1e-6)  # summed, mean
    assert m["logps/rejected"].item() == pytest.approx((math.log(0.45) + math.log(0.2)) / 2, abs=1e-6)
    # π → 1 on a rejected token: the term is capped (−log(1 − e^−1e-6) ≈ 13.8), never inf or NaN
    sure, _ = unlikelihood_loss(chosen[:1], chosen_mask[:1], torch.zeros(1, 3), rejected_mask[:1], 1.0)
    assert math.isfinite(sure.item()) and sure.item() > 13


def test_gradient_raises_the_chosen_token_and_lowers_the_rejected_one():
    """d loss / d logit of the labelled token: negative for the chosen response (gradient descent
    raises its probability), positive for the rejected one (lowers it), zero for it when α = 0."""
    torch.manual_seed(0)
    for alpha in (1.0, 0.0):
        logits = torch.randn(2, 1, 5, requires_grad=True)  # rows: chosen, rejected; one token each
        targets = torch.tensor([[2], [3]])
        lp = token_logps(logits, targets)  # (2, 1)
        mask = torch.ones(1, 1, dtype=torch.bool)
        loss, _ = unlikelihood_loss(lp[:1], mask, lp[1:], mask, alpha)
        loss.backward()
        assert logits.grad[0, 0, 2].item() < 0
        rejected_grad = logits.grad[1, 0, 3].item()
        assert rejected_grad > 0 if alpha else rejected_grad == 0


def _pairs(tok, n):
    return [tokenize_pair(PreferenceRecord(**r), tok, 64, 32) for r in tiny_prefs(n=n)]


def test_model_rows_chosen_first_then_rejected(tiny_llama_dir):
    """On `collate`'s 2B rows the method reads the first B as chosen, the last B as rejected: its
    summed log-probs are `sequence_logps` of those rows."""
    cfg = build_config({"method": "unlikelihood", "model": {"policy": str(tiny_llama_dir)}})
    tok, policy = load_tokenizer(cfg.model), load_policy(cfg.model)
    b = collate(_pairs(tok, 3), pad_token_id(tok))
    _, m = compute_loss(policy, None, b, alpha=1.0)
    ref = sequence_logps(policy, b["input_ids"], b["attention_mask"], b["labels"]).sum
    assert m["logps/chosen"].item() == pytest.approx(ref[:3].mean().item(), abs=1e-4)
    assert m["logps/rejected"].item() == pytest.approx(ref[3:].mean().item(), abs=1e-4)
    assert METHODS["unlikelihood"] is UNLIKELIHOOD and not UNLIKELIHOOD.uses_reference(cfg)


def test_trains_in_the_engine_loop_alpha_zero_is_preferred_ft(tiny_llama_dir):
    """Six steps through the engine's loop (engine.local.train_local): with α = 0 the loss curve is
    Preferred-FT's, step for step; with α = 5 the rejected responses end less likely than with α = 0."""
    curves = {}
    for name, method, alpha in (
        ("pft", PREFERRED_FT, 0.0),
        ("a0", UNLIKELIHOOD, 0.0),
        ("a5", UNLIKELIHOOD, 5.0),
    ):
        cfg = build_config({"method": method.name, "model": {"policy": str(tiny_llama_dir)},
                            "optim": {"lr": 3e-3}, "train": {"batch_size": 8, "max_steps": 6, "seed": 0},
                            "unlikelihood": {"alpha": alpha}})  # fmt: skip
        tok = load_tokenizer(cfg.model)
        curves[name] = train_local(cfg, method, _pairs(tok, 16), pad_token_id(tok))
    assert [h["loss"] for h in curves["a0"]] == pytest.approx([h["loss"] for h in curves["pft"]], abs=1e-6)
    assert curves["a0"][-1]["loss"] < curves["a0"][0]["loss"]
    assert curves["a5"][-1]["logps/rejected"] < curves["a0"][-1]["logps/rejected"] - 0.5
