"""Training objectives by method: each maps (model, reference, batch) to (loss, metrics).

- dpo:          the preference losses of `raydpo.losses` (train/step.compute_loss).
- sft:          next-token NLL on the response tokens (whole texts, or prompt → completion).
- preferred_ft: the same NLL on the chosen responses of preference pairs (DPO paper's
                "Preferred-FT" baseline).
- reward_model: Bradley–Terry loss −log σ(r(x, y_w) − r(x, y_l)) on a scalar head (Ouyang et al.
                2022, eq. 1; Stiennon et al. 2020), the reward read at each sequence's last token.

`paired` says whether a batch holds 2B rows (B chosen, then B rejected) or B single sequences;
gradient accumulation splits batches accordingly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raydpo.config import RunConfig
from raydpo.modeling import sequence_logps


@dataclass(frozen=True)
class Objective:
    fn: Callable  # (model, reference, batch) -> (loss, metrics of 0-d tensors)
    paired: bool  # batches hold chosen and rejected rows

    def __call__(self, model, reference, batch):
        return self.fn(model, reference, batch)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(N,) index of each row's last attended position; works for left or right padding."""
    t = attention_mask.shape[1]
    return t - 1 - attention_mask.flip(1).long().argmax(dim=1)


def reward_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """(N,) scalar rewards of a sequence-classification model, read at each row's last token."""
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask
    ).last_hidden_state  # (N, T, H)
    idx = last_token_index(attention_mask)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (N, H)
    return model.score(last).squeeze(-1).float()


def _nll(model, reference, batch):
    out = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    n = out.n_tokens.sum().clamp(min=1)
    loss = -out.sum.sum() / n  # mean NLL per response token over the batch
    return loss, {"loss": loss.detach(), "perplexity": torch.exp(loss.detach()), "tokens": n.float()}


def _bradley_terry(model, reference, batch):
    r = reward_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    b = r.shape[0] // 2
    margin = r[:b] - r[b:]
    loss = -F.logsigmoid(margin).mean()
    return loss, {
        "loss": loss.detach(),
        "accuracy": (margin > 0).float().mean().detach(),
        "margin": margin.mean().detach(),
        "rewards/chosen": r[:b].mean().detach(),
        "rewards/rejected": r[b:].mean().detach(),
    }


def make_objective(cfg: RunConfig) -> Objective:
    """The objective of `cfg.method` (PPO has its own loop in baselines/ppo.py)."""
    from raydpo.train.step import compute_loss

    if cfg.method == "dpo":
        return Objective(lambda m, ref, b: compute_loss(m, ref, b, cfg.loss), paired=True)
    table = {
        "sft": Objective(_nll, paired=False),
        "preferred_ft": Objective(_nll, paired=False),  # the collate keeps only the chosen rows
        "reward_model": Objective(_bradley_terry, paired=True),
    }
    return table[cfg.method]


# Metric names per method, for progress lines and sweep validation.
METHOD_METRICS = {
    "sft": ("loss", "perplexity", "tokens"),
    "preferred_ft": ("loss", "perplexity", "tokens"),
    "reward_model": ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"),
}
