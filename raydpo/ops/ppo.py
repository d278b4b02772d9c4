"""The pure math of PPO for RLHF: masked statistics, KL-shaped rewards, GAE, clipped losses, KL control.

Recipe: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv 1909.08593
(KL-penalized reward and adaptive KL coefficient, §2.2), as used by Stiennon et al. 2020 (arXiv
2009.01325, Eq. 1) and Ouyang et al. 2022 (arXiv 2203.02155, Eq. 2). PPO-clip: Schulman et al. 2017,
arXiv 1707.06347, Eq. 7 (policy) and the clipped value loss of its baselines implementation. GAE:
Schulman et al. 2015, arXiv 1506.02438, Eq. 16. The token-level formulation (one reward per response
token, the sequence score added at the last one) follows lm-human-preferences and TRL's PPOTrainer.

Every per-token tensor is over response tokens, shape (B, T), with a 0/1 `mask` (float or bool) that
marks real tokens; right padding is assumed. Off-mask entries of the inputs may hold anything (even
inf or nan): they are selected away with `torch.where`, never multiplied by 0, so they cannot leak
into values or gradients. Outputs are 0 off-mask. No Ray, no I/O, no models; the only host sync is
the emptiness check of `masked_var` (and so `masked_whiten`), which runs once per rollout batch.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

WHITEN_EPS = 1e-8


def _bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask, else 0 (not x * mask: 0 * inf is nan)."""
    return torch.where(_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ mask·x / Σ mask over all entries (dim=None, a scalar) or along `dim`.

    x, mask: same shape, e.g. (B, T). An empty mask (or an empty row, with `dim`) gives 0, not nan:
    the denominator is clamped to at least 1, so a batch with nothing to learn from has zero loss
    and zero gradient.
    """
    count = _bool(mask).sum() if dim is None else _bool(mask).sum(dim)
    total = _masked(x, mask).sum() if dim is None else _masked(x, mask).sum(dim)
    return total / count.clamp(min=1).to(x.dtype)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries of x, a scalar: Σ mask·(x − μ)² / (n − 1) (unbiased) or / n.

    μ = masked_mean(x, mask), n = Σ mask. Raises ValueError when n < 2 (unbiased) or n = 0 (biased),
    where the variance is undefined; that check is a host sync.
    """
    n = int(_bool(mask).sum())  # host sync
    if n < (2 if unbiased else 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} masked entries, got {n}")
    centered = x - masked_mean(x, mask)
    var = masked_mean(centered**2, mask)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x − μ) / sqrt(σ² + 1e-8) over the masked entries, 0 off-mask; μ added back if not shift_mean.

    μ, σ² = masked_mean, unbiased masked_var of x. Used on advantages (TRL PPOTrainer; the
    `shift_mean=False` form, scale only, on rewards in lm-human-preferences). x, mask: (B, T) -> (B, T).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    return _masked(whitened if shift_mean else whitened + mean, mask)


def _k1(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    return _masked(logprobs - ref_logprobs, mask)  # (B, T): log π(y_t) − log π_ref(y_t), 0 off-mask


def sequence_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence KL estimate Σ_t mask_t·(log π(y_t) − log π_ref(y_t)), the summed k1 estimator.

    Its mean over sampled responses is an unbiased estimate of KL(π ‖ π_ref) of the response
    distribution (Ziegler et al. 2019 §2.2). logprobs, ref_logprobs, mask: (B, T) -> (B,).
    """
    return _k1(logprobs, ref_logprobs, mask).sum(-1)


def kl_penalized_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Token rewards R_t = −β·(log π(y_t) − log π_ref(y_t)) + [t = last real token]·r(x, y).

    Ziegler et al. 2019 §2.2: R(x, y) = r(x, y) − β·log(π(y|x) / ρ(y|x)), spread over the response
    tokens with the score at the end (Stiennon et al. 2020 Eq. 1; Ouyang et al. 2022 Eq. 2).
    kl is the per-token k1 estimator, 0 off-mask.

    scores (B,), logprobs / ref_logprobs / mask (B, T), kl_coef β -> (rewards (B, T), kl (B, T)).
    The last real token is the highest masked index of each row. A row with an empty mask gets its
    score nowhere: its rewards are all 0 (no error, so no host sync).
    """
    kl = _k1(logprobs, ref_logprobs, mask)  # (B, T)
    m = _bool(mask)
    positions = torch.arange(m.shape[-1], device=m.device)  # (T,)
    last = torch.where(m, positions, -1).amax(-1, keepdim=True)  # (B, 1); -1 for an empty row
    score_here = (positions == last) & m  # (B, T); all False for an empty row
    rewards = -kl_coef * kl + torch.where(score_here, scores.to(kl.dtype).unsqueeze(-1), 0.0)
    return rewards, kl


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over masked tokens; returns (advantages, returns), (B, T) each.

    Schulman et al. 2015, arXiv 1506.02438, Eq. 16, by the reverse-time recursion
        δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t
        A_t = δ_t + γ·λ·m_{t+1}·A_{t+1}          (A_T = V_T = m_T = 0)
    returns_t = A_t + V_t, the value-function target. Both are 0 off-mask, so a padded position's
    reward or value never reaches a real one. Both are detached: they are targets, not paths for
    gradients. rewards, values, mask: (B, T).
    """
    m = _bool(mask)
    r = _masked(rewards.detach(), m)
    v = _masked(values.detach(), m)
    mf = m.to(v.dtype)
    advantages = torch.zeros_like(v)
    next_value = next_adv = torch.zeros_like(v[:, 0])  # (B,): V_{t+1}·m_{t+1}, A_{t+1}·m_{t+1}
    for t in reversed(range(v.shape[-1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        advantages[:, t] = (delta + gamma * lam * next_adv) * mf[:, t]
        next_value, next_adv = v[:, t] * mf[:, t], advantages[:, t]
    return advantages, _masked(advantages + v, m)


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip surrogate, minimized: masked_mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))), ρ = π/π_old.

    Schulman et al. 2017, arXiv 1707.06347, Eq. 7 (negated, per token). ρ_t = exp(log π(y_t) −
    log π_old(y_t)). Where the clipped term is the max the loss is constant in log π: no gradient.
    logprobs (grad), old_logprobs, advantages, mask: (B, T) -> (scalar loss, stats).

    stats, detached scalars: clipfrac (share of tokens where the clipped term is strictly larger),
    approx_kl = masked_mean(½·(log π − log π_old)²), ratio_mean = masked_mean(ρ).
    """
    log_ratio = _masked(logprobs - old_logprobs.detach(), mask)  # (B, T), 0 off-mask: ρ = 1 there
    ratio = torch.exp(log_ratio)
    adv = _masked(advantages.detach(), mask)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: ½·masked_mean(max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²)).

    The value clipping of PPO's reference implementation (openai/baselines ppo2; Ziegler et al.
    2019's lm-human-preferences; TRL PPOTrainer): the value head may move at most c from its
    rollout-time estimate before the loss stops rewarding the move. values (grad), old_values,
    returns, mask: (B, T) -> (scalar loss, stats); stats: vf_clipfrac (share of tokens where the
    clipped term is strictly larger), detached.
    """
    values = _masked(values, mask)  # padded entries may be nan: select them away before any arithmetic
    old, target = _masked(old_values.detach(), mask), _masked(returns.detach(), mask)
    clipped_values = old + torch.clamp(values - old, -clip_range_value, clip_range_value)
    unclipped_sq = (values - target) ** 2
    clipped_sq = (clipped_values - target) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_sq, clipped_sq), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_sq > unclipped_sq).to(values.dtype), mask)}
    return loss, stats


class KLController(Protocol):
    """The KL coefficient β of kl_penalized_rewards, read as `.value`, updated once per rollout batch."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None: ...


class FixedKLController:
    """A constant β (Stiennon et al. 2020; Ouyang et al. 2022 use a fixed coefficient)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: β stays fixed."""


class AdaptiveKLController:
    """Proportional control of β towards a target KL, Ziegler et al. 2019 §2.2.

        e = clip(KL_current / KL_target − 1, −0.2, 0.2)
        β ← β·(1 + e·n_steps / horizon)

    The paper writes β_{t+1} = β_t·(1 + K_β·e_t) with K_β = 0.1; the n_steps / horizon gain is its
    implementation's (lm-human-preferences, TRL's AdaptiveKLController). current_kl is the mean
    sequence KL of the batch (sequence_kl), n_steps the number of samples it covered.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
