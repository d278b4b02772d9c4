"""Unlikelihood training on preference pairs, the DPO paper's §6.1 baseline.

The policy raises the likelihood of the preferred response y_w and lowers, token by token, the
probability of the dispreferred one y_l with the unlikelihood term of Welleck et al. 2019
("Neural Text Generation with Unlikelihood Training", arXiv 1908.04319, eq. 4), weighted by α
(`unlikelihood.alpha`, the paper's "optional coefficient α ∈ [0, 1]"):

    L = −mean_t log π(y_w,t | x, y_w,<t)  −  α · mean_t log(1 − π(y_l,t | x, y_l,<t))

with each mean over the response tokens of the whole batch (as SFT and Preferred-FT). There is no
reference model and no KL term: nothing but α limits how far the policy moves. A batch is
`data.tokenize.collate`'s 2B rows, the B chosen sequences first, then the B rejected ones.
"""

from __future__ import annotations

import torch

from raydpo.config import RunConfig
from raydpo.engine.method import Method, Metrics, Objective
from raydpo.ops.logprobs import IGNORE_INDEX, token_logps

METRICS = ("loss", "loss/likelihood", "loss/unlikelihood", "logps/chosen", "logps/rejected")
MAX_LOGP = -1e-6  # log π is capped here inside log(1 − π): the term stays finite (≤ 13.8) at π → 1


def unlikelihood_loss(chosen_lp: torch.Tensor, chosen_mask: torch.Tensor, rejected_lp: torch.Tensor,
                      rejected_mask: torch.Tensor, alpha: float) -> tuple[torch.Tensor, Metrics]:  # fmt: skip
    """(loss, metrics) from token log-probs: *_lp (B, T) float, *_mask (B, T) bool (response tokens).

    likelihood   = −Σ_{i,t} log π(y_w,t) / N_w           over the N_w chosen response tokens of the batch
    unlikelihood = −Σ_{i,t} log(1 − π(y_l,t)) / N_l      over the N_l rejected response tokens
    loss         = likelihood + α · unlikelihood

    The likelihood term is Preferred-FT's loss (methods/supervised.py:nll): with α = 0 the two
    methods are the same.
    """
    cm, rm = chosen_mask.to(chosen_lp.dtype), rejected_mask.to(rejected_lp.dtype)
    likelihood = -(chosen_lp * cm).sum() / cm.sum().clamp(min=1)
    log_not = torch.log(-torch.expm1(rejected_lp.clamp(max=MAX_LOGP)))  # log(1 − π), stable near π = 1
    unlikelihood = -(log_not * rm).sum() / rm.sum().clamp(min=1)
    loss = likelihood + alpha * unlikelihood
    return loss, {
        "loss": loss.detach(),
        "loss/likelihood": likelihood.detach(),
        "loss/unlikelihood": unlikelihood.detach(),
        "logps/chosen": (chosen_lp * cm).sum(-1).detach().mean(),  # summed per sequence, as DPO's
        "logps/rejected": (rejected_lp * rm).sum(-1).detach().mean(),
    }


def compute_loss(policy, reference, batch: dict, alpha: float) -> tuple[torch.Tensor, Metrics]:
    """One forward pass over the 2B rows, then `unlikelihood_loss` on their response tokens."""
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False).logits  # (2B, T, V)  # fmt: skip
    targets = batch["labels"][:, 1:]  # (2B, T-1): the logit at t scores the token at t + 1
    mask = targets != IGNORE_INDEX
    lp = token_logps(logits[:, :-1], targets.masked_fill(~mask, 0))  # (2B, T-1)
    b = lp.shape[0] // 2
    return unlikelihood_loss(lp[:b], mask[:b], lp[b:], mask[b:], alpha)


def objective(cfg: RunConfig) -> Objective:
    alpha = cfg.unlikelihood.alpha
    return Objective(lambda m, ref, batch: compute_loss(m, ref, batch, alpha), paired=True)


UNLIKELIHOOD = Method(
    name="unlikelihood", objective=objective, data="pairs", metrics=METRICS, eval_metrics=METRICS,
    params=("unlikelihood",),
    progress=(("loss", "loss"), ("logp w", "logps/chosen"), ("logp l", "logps/rejected")),
)  # fmt: skip
