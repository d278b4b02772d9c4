"""Preference-optimization losses: pure functions of sequence log-probs, plus the LOSSES registry.

Every loss has the signature

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, **params)

with 1-D inputs of shape (B,) and returns a `LossOutput` of three (B,) tensors. Notation used in the
docstrings: r_c = log π(y_w|x) − log π_ref(y_w|x), r_l = log π(y_l|x) − log π_ref(y_l|x) (the implicit
rewards over β) and Δ = r_c − r_l (the log-ratio margin). The formulas match TRL 1.16's
`DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py) and, for SimPO, `CPOTrainer.cpo_loss`
(trl/experimental/cpo/cpo_trainer.py), for the default `f_divergence_type="reverse_kl"`.

No Ray, no I/O, no host syncs: the training step calls these on the device.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class LossOutput(NamedTuple):
    losses: Tensor  # (B,) per-pair loss, carries grad
    chosen_rewards: Tensor  # (B,) detached, β·(log π − log π_ref) (β·log π for reference-free losses)
    rejected_rewards: Tensor  # (B,) detached


LossFn = Callable[..., LossOutput]
LOSSES: dict[str, LossFn] = {}
_REDUCTIONS = ("sum", "mean")


def register(
    name: str, *, reduction: str = "sum", reference_free: bool = False
) -> Callable[[LossFn], LossFn]:
    """Add a loss to LOSSES under `name`.

    `reduction` is the sequence log-prob the loss wants: "sum" (summed over response tokens, the
    sequence log-likelihood) or "mean" (averaged per token). `reference_free` losses ignore the
    reference log-probs, so the trainer need not compute them.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")

    def deco(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        fn.loss_name = name  # type: ignore[attr-defined]
        fn.reduction = reduction  # type: ignore[attr-defined]
        fn.reference_free = reference_free  # type: ignore[attr-defined]
        LOSSES[name] = fn
        return fn

    return deco


def loss_params(name: str) -> set[str]:
    """The extra keyword-only parameters of LOSSES[name] (all keyword-only ones except `beta`)."""
    sig = inspect.signature(_lookup(name))
    return {p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY and p.name != "beta"}


def _lookup(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; allowed: {', '.join(sorted(LOSSES))}") from None


def _logratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    return pc - rc, pr - rr  # r_c, r_l: (B,) each


def _out(losses: Tensor, beta: float, r_c: Tensor, r_l: Tensor) -> LossOutput:
    # Rewards are for logging and accuracy metrics only: never let gradients flow through them.
    return LossOutput(losses, beta * r_c.detach(), beta * r_l.detach())


@register("sigmoid")
def sigmoid(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO: −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ).

    Rafailov et al. 2023, arXiv 2305.18290, Eq. 7 (ε = 0). ε > 0 is conservative DPO (cDPO,
    Mitchell 2023, "A note on DPO with noisy preferences"): labels flipped with probability ε.
    TRL 1.16's DPOTrainer applies no label smoothing to "sigmoid"; with ε = 0 the two agree.
    Reduction "sum": Δ is a difference of sequence log-likelihoods, as in the paper.
    """
    r_c, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (r_c - r_l)  # (B,) βΔ
    # logsigmoid, not log(sigmoid(.)): stable for large |βΔ|.
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return _out(losses, beta, r_c, r_l)


@register("ipo", reduction="mean")
def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """IPO: (Δ − 1/(2β))², β playing the role of the paper's τ.

    Azar et al. 2023, arXiv 2310.12036, Eq. 17. Reduction "mean": TRL 1.16 divides the summed
    log-ratios by each response's token count, which equals passing per-token-mean log-probs; this
    keeps the squared loss from scaling with response length (confirmed with the IPO authors, per
    TRL). The paper's summed form is available through `combined_loss(..., reduction="sum")`.
    """
    r_c, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (r_c - r_l - 1 / (2 * beta)) ** 2  # (B,)
    return _out(losses, beta, r_c, r_l)


@register("hinge")
def hinge(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """SLiC / RSO hinge: relu(1 − βΔ).

    SLiC-HF, Zhao et al. 2023, arXiv 2305.10425 (calibration loss, margin 1); with the reference
    log-ratio and margin 1/β as in RSO, Liu et al. 2023, arXiv 2309.06657. Reduction "sum":
    sequence log-likelihoods, as DPO.
    """
    r_c, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * (r_c - r_l))  # (B,)
    return _out(losses, beta, r_c, r_l)


@register("robust")
def robust(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """Robust DPO: (−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)) / (1 − 2ε), ε in [0, 0.5).

    Provably robust DPO (rDPO), Chowdhury et al. 2024, arXiv 2403.00409: an unbiased estimate of the
    clean DPO loss when labels are flipped with probability ε. Reduction "sum", as DPO.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs label_smoothing in [0, 0.5), got {label_smoothing}")
    r_c, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (r_c - r_l)  # (B,) βΔ
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )
    return _out(losses, beta, r_c, r_l)


@register("bco_pair")
def bco_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Paired BCO: −logσ(β·r_c) − logσ(−β·r_l).

    BCO, Jung et al. 2024, arXiv 2404.04656, applied to both sides of a pair. This is TRL 1.16's
    form: it drops the paper's reward shift δ (a running mean of the rewards). Reduction "sum".
    """
    r_c, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * r_c) - F.logsigmoid(-beta * r_l)  # (B,)
    return _out(losses, beta, r_c, r_l)


@register("nca_pair")
def nca_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """Paired NCA: −logσ(β·r_c) − ½·logσ(−β·r_c) − ½·logσ(−β·r_l).

    NCA, Chen et al. 2024, arXiv 2402.05369, for a preference pair (TRL 1.16's form). Reduction "sum".
    """
    r_c, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    zc, zl = beta * r_c, beta * r_l  # (B,) each
    losses = -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zl)
    return _out(losses, beta, r_c, r_l)


@register("sppo_hard")
def sppo_hard(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """SPPO with hard probabilities: (r_c − 1/(2β))² + (r_l + 1/(2β))².

    Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 of Algorithm 1 with P = 1 for the winner and 0 for
    the loser, and η = 1/β (as in TRL). Reduction "sum".
    """
    r_c, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (r_c - 0.5 / beta) ** 2 + (r_l + 0.5 / beta) ** 2  # (B,)
    return _out(losses, beta, r_c, r_l)


@register("apo_zero")
def apo_zero(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """APO-zero: (1 − σ(β·r_c)) + σ(β·r_l).

    D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7: for chosen answers better than the model's
    own; raises chosen and lowers rejected likelihood. Reduction "sum".
    """
    r_c, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (1 - torch.sigmoid(beta * r_c)) + torch.sigmoid(beta * r_l)  # (B,)
    return _out(losses, beta, r_c, r_l)


@register("apo_down")
def apo_down(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> LossOutput:
    """APO-down: σ(β·r_c) + (1 − σ(β·(r_c − r_l))).

    D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 8: for chosen answers worse than the model's
    own; lowers both likelihoods, rejected more. Reduction "sum".
    """
    r_c, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.sigmoid(beta * r_c) + (1 - torch.sigmoid(beta * (r_c - r_l)))  # (B,)
    return _out(losses, beta, r_c, r_l)


@register("exo_pair")
def exo_pair(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 1e-3,
) -> LossOutput:
    """EXO (pairwise): q_w·(logσ(βΔ) − log(1−ε)) + q_l·(logσ(−βΔ) − log ε), q_w = σ(βΔ), q_l = σ(−βΔ).

    Ji et al. 2024, arXiv 2402.00856, Eq. 16 for K = 2: KL(p_θ ‖ p_rh) between the policy's
    softmax over {chosen, rejected} and the smoothed label distribution p_rh = (1−ε, ε).
    ε in (0, 1); the paper recommends 1e-3. Reduction "sum".
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair loss needs label_smoothing in (0, 1), got {label_smoothing}")
    r_c, r_l = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (r_c - r_l)  # (B,) βΔ
    q_w, q_l = torch.sigmoid(logits), torch.sigmoid(-logits)
    log_pw, log_pl = math.log1p(-label_smoothing), math.log(label_smoothing)
    losses = q_w * (F.logsigmoid(logits) - log_pw) + q_l * (F.logsigmoid(-logits) - log_pl)
    return _out(losses, beta, r_c, r_l)


@register("simpo", reduction="mean", reference_free=True)
def simpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    gamma: float = 0.5,
) -> LossOutput:
    """SimPO: −logσ(β·(log π_c − log π_r) − γ); the reference log-probs are ignored.

    Meng et al. 2024, arXiv 2405.14734, Eq. 6, γ the target reward margin (TRL's CPOTrainer with
    loss_type="simpo", label_smoothing 0). Reduction "mean": the paper's reward is the length-
    normalized (per-token mean) log-likelihood. Rewards are β·log π (no reference).
    """
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)  # (B,)
    return _out(losses, beta, policy_chosen_logps, policy_rejected_logps)


def combined_loss(
    names: Sequence[str],
    weights: Sequence[float] | None,
    *,
    beta: float,
    params: Mapping[str, float],
    policy_logps: Mapping[str, tuple[Tensor, Tensor]],
    ref_logps: Mapping[str, tuple[Tensor, Tensor]] | None,
    reduction: str | None = None,
) -> LossOutput:
    """Σ_i weight_i · LOSSES[names[i]], each fed the log-probs of the reduction it wants.

    `policy_logps` / `ref_logps` map "sum" and "mean" to (chosen, rejected), each (B,); only the
    entries the named losses use need be present. `reduction` overrides every loss's own choice.
    Each loss gets the subset of `params` it accepts (`loss_params`). `ref_logps` may be None only
    if every loss is reference-free; those then receive zeros in place of the reference log-probs.
    The rewards returned are those of the first loss.
    """
    if not names:
        raise ValueError("combined_loss needs at least one loss name")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weights for {len(names)} losses")
    total: Tensor | None = None
    first: LossOutput | None = None
    for name, weight in zip(names, weights, strict=True):
        fn = _lookup(name)
        red = reduction or fn.reduction  # type: ignore[attr-defined]
        pc, pr = policy_logps[red]
        if ref_logps is not None:
            rc, rr = ref_logps[red]
        elif fn.reference_free:  # type: ignore[attr-defined]
            rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
        else:
            raise ValueError(f"loss {name!r} needs reference log-probs, but ref_logps is None")
        accepted = loss_params(name)
        out = fn(pc, pr, rc, rr, beta=beta, **{k: v for k, v in params.items() if k in accepted})
        total = weight * out.losses if total is None else total + weight * out.losses  # (B,)
        if first is None:
            first = out
    assert total is not None and first is not None
    return LossOutput(total, first.chosen_rewards, first.rejected_rewards)
