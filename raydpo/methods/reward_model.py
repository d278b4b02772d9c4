"""The reward model behind PPO and Best-of-N: a scalar head on the policy architecture trained with the
Bradley–Terry loss −log σ(r(x, y_w) − r(x, y_l)) (Ouyang et al. 2022, eq. 1; Stiennon et al. 2020).

The reward is read at each sequence's last real token, the EOS (`ops.logprobs.reward_scores`); at
inference `models.scoring.score_texts` builds the same rows from text. Metric names are DPO's
(`rewards/accuracies`, `rewards/margins`, …), so the two compare in one MLflow column.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from raydpo.config import RunConfig
from raydpo.engine.method import Method, Objective
from raydpo.models.loading import load_reward_model
from raydpo.ops.logprobs import reward_scores

METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def bradley_terry(model, reference, batch):
    r = reward_scores(model, batch["input_ids"], batch["attention_mask"])  # (2B,)
    b = r.shape[0] // 2
    margin = r[:b] - r[b:]
    loss = -F.logsigmoid(margin).mean()
    return loss, {
        "loss": loss.detach(),
        "rewards/accuracies": (margin > 0).float().mean().detach(),
        "rewards/margins": margin.mean().detach(),
        "rewards/chosen": r[:b].mean().detach(),
        "rewards/rejected": r[b:].mean().detach(),
    }


def objective(cfg: RunConfig) -> Objective:
    return Objective(bradley_terry, paired=True)


def _load(cfg: RunConfig, checkpoint: Path | None):
    return load_reward_model(cfg.model, checkpoint=checkpoint)


REWARD_MODEL = Method(
    name="reward_model", objective=objective, data="pairs", metrics=METRICS, eval_metrics=METRICS,
    load_model=_load, progress=(("loss", "loss"), ("acc", "rewards/accuracies")),
)  # fmt: skip
