"""The DPO family: one method whose objective is any combination of `raydpo.losses` (sigmoid, IPO,
hinge, …) on summed or averaged sequence log-probs.

A batch is `data.tokenize.collate`'s 2B rows (the B chosen sequences first, then the B rejected
ones) or, where the model supports it, `collate_shared`'s B rows with each prompt computed once
(`train.prefix_sharing`); `ops.logprobs.pair_logps` reads both, so policy and reference each need
one forward pass per step. Metric names follow TRL's; as in
TRL, `rewards/*` and `logps/*` use the *summed* log-probs whatever reduction the loss itself uses
(IPO and SimPO average per token).
"""

from __future__ import annotations

import torch

from raydpo.config import LossConfig, RunConfig
from raydpo.engine.distributed import adapters_off, has_adapters
from raydpo.engine.method import Method, Metrics, Objective
from raydpo.losses import LOSSES, combined_loss
from raydpo.ops.logprobs import SequenceLogps, pair_logps

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")  # fmt: skip


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0] // 2
    return x[:b], x[b:]  # chosen (B,), rejected (B,)


def reference_logps(reference, policy, batch: dict, response_only: bool = False) -> torch.Tensor | None:
    """Summed reference log-probs (2B,): precomputed in the batch (`train.precompute_reference`), from
    the reference model, or from the policy's LoRA base."""
    if "ref_chosen" in batch:
        return torch.cat([batch["ref_chosen"], batch["ref_rejected"]])
    if reference is not None:
        with torch.no_grad():
            return pair_logps(reference, batch, response_only).sum
    if has_adapters(policy):  # model.lora: the base model with the adapters off is the reference
        with torch.no_grad(), adapters_off(policy) as base:
            return pair_logps(base, batch, response_only).sum
    return None


def batch_reference(policy, reference, batch: dict, loss_cfg: LossConfig, response_only: bool = False
                    ) -> dict[str, torch.Tensor]:  # fmt: skip
    """`ref_chosen` / `ref_rejected` (B,) of a whole batch, or {} when the loss reads no reference or
    the batch already has them: one no-grad pass ahead of the policy's (engine.step.train_step)."""
    if "ref_chosen" in batch or not needs_reference(loss_cfg):
        return {}
    ref_sum = reference_logps(reference, policy, batch, response_only)
    if ref_sum is None:
        return {}
    chosen, rejected = _pairs(ref_sum)
    return {"ref_chosen": chosen, "ref_rejected": rejected}


def needs_reference(loss_cfg: LossConfig) -> bool:
    return not all(getattr(LOSSES[n], "reference_free", False) for n in loss_cfg.names)


def compute_loss(
    policy, reference, batch: dict, loss_cfg: LossConfig, response_only: bool = False
) -> tuple[torch.Tensor, Metrics]:
    """Scalar loss (mean over pairs) and detached per-batch metrics (0-d tensors; no host sync)."""
    pol: SequenceLogps = pair_logps(policy, batch, response_only)
    ref_sum = reference_logps(reference, policy, batch, response_only) if needs_reference(loss_cfg) else None
    policy_logps = {"sum": _pairs(pol.sum), "mean": _pairs(pol.mean)}
    ref_logps = None
    if ref_sum is not None:
        ref_sum = ref_sum.to(pol.sum.dtype)
        ref_logps = {"sum": _pairs(ref_sum), "mean": _pairs(ref_sum / pol.n_tokens.clamp(min=1))}
    out = combined_loss(
        loss_cfg.names, loss_cfg.weights, beta=loss_cfg.beta, params=loss_cfg.params,
        policy_logps=policy_logps, ref_logps=ref_logps, reduction=loss_cfg.reduction,
    )  # fmt: skip
    loss = out.losses.mean()
    if loss_cfg.sft_weight > 0:  # RPO-style NLL on the chosen response, per token
        loss = loss + loss_cfg.sft_weight * (-policy_logps["mean"][0]).mean()
    return loss, _metrics(loss, pol, ref_sum, out, loss_cfg.beta)


def _metrics(loss, pol: SequenceLogps, ref_sum, out, beta: float) -> Metrics:
    chosen, rejected = _pairs(pol.sum.detach())
    if ref_sum is not None:  # TRL's convention: rewards from summed log-ratios
        ref_c, ref_r = _pairs(ref_sum)
        r_c, r_r = beta * (chosen - ref_c), beta * (rejected - ref_r)
    else:  # reference-free losses report their own rewards
        r_c, r_r = out.chosen_rewards, out.rejected_rewards
    return {
        "loss": loss.detach(),
        "rewards/chosen": r_c.mean(),
        "rewards/rejected": r_r.mean(),
        "rewards/accuracies": (r_c > r_r).float().mean(),
        "rewards/margins": (r_c - r_r).mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
    }


def objective(cfg: RunConfig) -> Objective:
    loss_cfg, response_only = cfg.loss, cfg.train.response_only_logits
    fn = lambda m, ref, b: compute_loss(m, ref, b, loss_cfg, response_only)
    ahead = lambda m, ref, b: batch_reference(m, ref, b, loss_cfg, response_only)  # noqa: E731
    return Objective(fn, paired=True, shared_prefix=True, reads_reference=True, batch_reference=ahead)


def _uses_reference(cfg: RunConfig) -> bool:
    return needs_reference(cfg.loss)


DPO = Method(
    name="dpo", objective=objective, data="pairs", metrics=METRICS, eval_metrics=METRICS, kind="train",
    params=("loss",), uses_reference=_uses_reference,
    progress=(("loss", "loss"), ("acc", "rewards/accuracies"), ("margin", "rewards/margins")),
)  # fmt: skip
