"""One DPO training step as pure functions: log-probs → loss → backward. No Ray, no I/O.

The batch is the output of `data.tokenize.collate`: 2B rows, the B chosen sequences first, then
the B rejected ones, so policy and reference each need one forward pass per step. When the batch
carries `ref_chosen_logps` / `ref_rejected_logps` (summed, precomputed), the reference model is
not run at all.

Metric names follow TRL (DESIGN.md). As in TRL, `rewards/*` and `logps/*` use the *summed*
log-probs, whatever reduction the loss itself uses (IPO and SimPO average per token).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from raydpo.config import LossConfig
from raydpo.losses import LOSSES, combined_loss
from raydpo.modeling import SequenceLogps, sequence_logps

# Names of the metrics every step reports (TRL's names) and those the eval split reports.
EVAL_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")  # fmt: skip
TRAIN_METRICS = EVAL_METRICS + ("grad_norm", "learning_rate", "pairs_per_second", "tokens_per_second")


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0] // 2
    return x[:b], x[b:]  # chosen (B,), rejected (B,)


def reference_logps(reference, policy, batch: dict) -> torch.Tensor | None:
    """Summed reference log-probs (2B,): from the batch, the reference model, or the LoRA base."""
    if "ref_chosen_logps" in batch:
        return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    if reference is not None:
        with torch.no_grad():
            return sequence_logps(reference, *args).sum
    if hasattr(policy, "disable_adapter"):  # peft: the base model with adapters off is the reference
        with torch.no_grad(), policy.disable_adapter():
            return sequence_logps(policy, *args).sum
    return None


def needs_reference(loss_cfg: LossConfig) -> bool:
    return not all(getattr(LOSSES[n], "reference_free", False) for n in loss_cfg.names)


def compute_loss(policy, reference, batch: dict, loss_cfg: LossConfig) -> tuple[torch.Tensor, dict]:
    """Scalar loss (mean over pairs) and detached per-batch metrics (0-d tensors; no host sync)."""
    pol: SequenceLogps = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["labels"])
    ref_sum = reference_logps(reference, policy, batch) if needs_reference(loss_cfg) else None
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


def _metrics(loss, pol: SequenceLogps, ref_sum, out, beta: float) -> dict[str, torch.Tensor]:
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


def split_batch(batch: dict, parts: int, paired: bool = True) -> list[dict]:
    """Split a collated batch of B pairs (or B single rows) into `parts` micro-batches."""
    if parts == 1:
        return [batch]
    b = batch["input_ids"].shape[0] // (2 if paired else 1)
    size = b // parts
    out = []
    for k in range(parts):
        sel = torch.arange(k * size, (k + 1) * size)
        if paired:
            sel = torch.cat([sel, torch.arange(b + k * size, b + (k + 1) * size)])
        mb = {}
        for key, v in batch.items():
            mb[key] = v[k * size : (k + 1) * size] if key.startswith("ref_") else v[sel]
        out.append(_trim(mb))
    return out


def _trim(mb: dict) -> dict:
    """Drop padding columns that no row of a micro-batch uses."""
    width = int(mb["attention_mask"].sum(-1).max())  # host sync, once per micro-batch
    return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in mb.items()}


def train_step(policy, reference, batch: dict, objective, accum_steps: int = 1, sync=None) -> dict:
    """Forward + backward over `accum_steps` micro-batches; gradients accumulate in the policy.

    `objective` is an `objectives.Objective` (or a LossConfig, meaning DPO with those losses).

    Each micro-batch loss is scaled by 1/accum_steps, so the summed gradient equals that of the
    whole batch's mean loss. `sync(is_last)` returns a context manager (DDP's no_sync on all but the
    last micro-batch); None means no gradient synchronization to manage. Returns averaged metrics.
    """
    if isinstance(objective, LossConfig):
        from raydpo.train.objectives import Objective

        loss_cfg = objective
        objective = Objective(lambda m, ref, b: compute_loss(m, ref, b, loss_cfg), paired=True)
    totals: dict[str, torch.Tensor] = {}
    micro = split_batch(batch, accum_steps, objective.paired)
    for i, mb in enumerate(micro):
        ctx = sync(i == len(micro) - 1) if sync else nullcontext()
        with ctx:
            loss, metrics = objective(policy, reference, mb)
            (loss / len(micro)).backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0) + v / len(micro)
    return totals
