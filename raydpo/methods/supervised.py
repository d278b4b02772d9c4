"""Supervised baselines: SFT (next-token NLL on texts or completions) and Preferred-FT (the same NLL
on the chosen responses of preference pairs, the DPO paper's "Preferred-FT" baseline)."""

from __future__ import annotations

from raydpo.config import RunConfig
from raydpo.engine.method import Method, Objective
from raydpo.ops.logprobs import sequence_logps

METRICS = ("loss", "perplexity", "tokens")


def nll(model, reference, batch):
    """Mean NLL per response token over the batch (B single rows)."""
    out = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    n = out.n_tokens.sum().clamp(min=1)
    loss = -out.sum.sum() / n
    return loss, {"loss": loss.detach(), "perplexity": loss.detach().exp(), "tokens": n.float()}


def objective(cfg: RunConfig) -> Objective:
    return Objective(nll, paired=False)  # collate keeps the chosen rows only


_SHOWN = (("loss", "loss"), ("ppl", "perplexity"))
SFT = Method(name="sft", objective=objective, data="texts", metrics=METRICS, eval_metrics=METRICS,
             progress=_SHOWN)  # fmt: skip
PREFERRED_FT = Method(name="preferred_ft", objective=objective, data="pairs", metrics=METRICS,
                      eval_metrics=METRICS, progress=_SHOWN)  # fmt: skip
