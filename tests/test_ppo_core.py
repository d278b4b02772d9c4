"""Tests for raydpo.ops.ppo: hand-derived values and properties of the PPO-for-RLHF math.

All hand-derived examples are float64. Padded (off-mask) positions hold deliberately wild values
(100, inf, nan) to show they never leak into results or gradients. Constants (10 decimals):
    ln 1.5 = 0.4054651081    ln 0.5 = −0.6931471806    ln 1.1 = 0.0953101798
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from raydpo.ops.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    sequence_kl,
    value_loss,
)

INF, NAN = math.inf, math.nan


def f64(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def random_batch(seed: int, b: int = 4, t: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (b, t) float64, right-padded float mask with row lengths in [2, t])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).to(torch.float64)
    return x, mask


# ------------------------------------------------------------------------------------- masked statistics


def test_masked_mean_and_var_values():
    """x = [1, 2, 3 | inf]: mean (1 + 2 + 3)/3 = 2; squared deviations 1, 0, 1 sum to 2;
    unbiased var 2/2 = 1, biased 2/3. Along dim 1 with rows [1, 2, 3 | inf] and [4 | nan, nan, nan]:
    [2, 4]. An empty mask gives 0."""
    x, mask = f64([1.0, 2.0, 3.0, INF]), f64([1.0, 1.0, 1.0, 0.0])
    assert_close(masked_mean(x, mask), scalar(2.0))
    assert_close(masked_var(x, mask), scalar(1.0))
    assert_close(masked_var(x, mask, unbiased=False), scalar(2.0 / 3.0))
    rows = f64([1.0, 2.0, 3.0, INF], [4.0, NAN, NAN, NAN])
    row_mask = f64([1, 1, 1, 0], [1, 0, 0, 0]).bool()
    assert_close(masked_mean(rows, row_mask, dim=1), f64(2.0, 4.0))
    assert_close(masked_mean(x, torch.zeros(4)), scalar(0.0))


def test_masked_var_rejects_too_few_entries():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(f64(1.0, 2.0), f64(1.0, 0.0))
    with pytest.raises(ValueError, match="at least 1"):
        masked_var(f64(1.0, 2.0), f64(0.0, 0.0), unbiased=False)


def test_masked_whiten_gives_masked_mean_0_var_1():
    """Over the masked entries: mean 0, unbiased var σ²/(σ² + 1e-8) ≈ 1; off-mask entries are 0.
    shift_mean=False keeps the mean μ and still scales the spread to 1."""
    x, mask = random_batch(0)
    x = x * 3 + 5
    x[mask == 0] = NAN
    w = masked_whiten(x, mask)
    assert_close(masked_mean(w, mask), scalar(0.0))
    assert_close(masked_var(w, mask), scalar(1.0))
    assert (w[mask == 0] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)
    assert_close(masked_mean(kept, mask), masked_mean(x, mask))
    assert_close(masked_var(kept, mask), scalar(1.0))


# ------------------------------------------------------------------------------------------ KL and rewards


def kl_example() -> tuple[torch.Tensor, ...]:
    """Two rows, lengths 3 and 2: (scores, logprobs, ref_logprobs, mask)."""
    scores = f64(2.0, -1.0)
    logprobs = f64([-1.0, -2.0, -0.5], [-1.5, -0.25, 9.0])
    ref = f64([-1.5, -1.0, -0.5], [-1.0, -1.0, INF])
    mask = f64([1, 1, 1], [1, 1, 0])
    return scores, logprobs, ref, mask


def test_kl_penalized_rewards_value():
    """kl_coef β = 0.1.
    kl = logprobs − ref: row 0: (−1 + 1.5, −2 + 1, −0.5 + 0.5) = (0.5, −1, 0);
                         row 1: (−1.5 + 1, −0.25 + 1, pad) = (−0.5, 0.75, 0).
    −β·kl: row 0: (−0.05, 0.1, 0); row 1: (0.05, −0.075, 0).
    Scores at the last real token: row 0 at t=2: 0 + 2 = 2; row 1 at t=1: −0.075 − 1 = −1.075.
    rewards = [[−0.05, 0.1, 2], [0.05, −1.075, 0]]."""
    scores, logprobs, ref, mask = kl_example()
    rewards, kl = kl_penalized_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    assert_close(kl, f64([0.5, -1.0, 0.0], [-0.5, 0.75, 0.0]))
    assert_close(rewards, f64([-0.05, 0.1, 2.0], [0.05, -1.075, 0.0]))
    rewards_bool, _ = kl_penalized_rewards(scores, logprobs, ref, mask.bool(), kl_coef=0.1)
    assert_close(rewards_bool, rewards)


def test_kl_penalized_rewards_empty_row_gets_no_score():
    """A row with an empty mask: kl 0, rewards 0 everywhere; its score (5) lands nowhere."""
    rewards, kl = kl_penalized_rewards(f64(5.0), f64([-1.0, -2.0]), f64([-3.0, 0.0]), f64([0, 0]), 0.1)
    assert_close(rewards, f64([0.0, 0.0]))
    assert_close(kl, f64([0.0, 0.0]))


def test_sequence_kl_value():
    """Row sums of the kl above: row 0: 0.5 − 1 + 0 = −0.5; row 1: −0.5 + 0.75 = 0.25."""
    _, logprobs, ref, mask = kl_example()
    assert_close(sequence_kl(logprobs, ref, mask), f64(-0.5, 0.25))


# ------------------------------------------------------------------------------------------------- GAE


def test_gae_value():
    """γ = 1, λ = 0.5, rewards (1, 0, 2), values (0.5, 1, 1.5), all real.
    t=2: δ = 2 + 0 − 1.5 = 0.5;          A = 0.5.
    t=1: δ = 0 + 1.5 − 1 = 0.5;          A = 0.5 + 0.5·0.5 = 0.75.
    t=0: δ = 1 + 1 − 0.5 = 1.5;          A = 1.5 + 0.5·0.75 = 1.875.
    returns = A + V = (2.375, 1.75, 2)."""
    adv, ret = gae(f64([1.0, 0.0, 2.0]), f64([0.5, 1.0, 1.5]), f64([1, 1, 1]), gamma=1.0, lam=0.5)
    assert_close(adv, f64([1.875, 0.75, 0.5]))
    assert_close(ret, f64([2.375, 1.75, 2.0]))


def test_gae_padding_does_not_leak():
    """γ = 1, λ = 0.5, rewards (1, 2 | 7), values (0.5, 1 | 100), mask (1, 1, 0).
    t=2: off-mask: A = 0, and m_2 = 0 hides V_2 = 100 and A_2 from t=1.
    t=1: δ = 2 + 1·100·0 − 1 = 1;        A = 1 + 0.5·0·A_2 = 1.
    t=0: δ = 1 + 1·1·1 − 0.5 = 1.5;      A = 1.5 + 0.5·1 = 2.
    returns = (2.5, 2, 0). Same as the unpadded 1×2 problem; a second row of length 3 (the example
    above) in the same batch is unchanged."""
    rewards = f64([1.0, 2.0, 7.0], [1.0, 0.0, 2.0])
    values = f64([0.5, 1.0, 100.0], [0.5, 1.0, 1.5])
    adv, ret = gae(rewards, values, f64([1, 1, 0], [1, 1, 1]), gamma=1.0, lam=0.5)
    assert_close(adv, f64([2.0, 1.0, 0.0], [1.875, 0.75, 0.5]))
    assert_close(ret, f64([2.5, 2.0, 0.0], [2.375, 1.75, 2.0]))
    short_adv, _ = gae(f64([1.0, 2.0]), f64([0.5, 1.0]), f64([1, 1]), gamma=1.0, lam=0.5)
    assert_close(adv[0, :2], short_adv[0])


def test_gae_lambda_1_is_reward_to_go_minus_value():
    """γ = λ = 1: the values telescope away, A_t = Σ_{s≥t} r_s − V_t over real tokens."""
    rewards, mask = random_batch(1)
    values, _ = random_batch(2)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = rewards * mask
    to_go = masked_rewards.flip(-1).cumsum(-1).flip(-1)
    assert_close(adv, (to_go - values) * mask)
    assert_close(ret, to_go * mask)


def test_gae_outputs_carry_no_grad():
    rewards, mask = random_batch(3)
    values = torch.randn_like(rewards, requires_grad=True)
    adv, ret = gae(rewards.requires_grad_(), values, mask)
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------------------- PPO policy loss


def policy_case(adv: list[float], ratios: list[float]) -> tuple[torch.Tensor, ...]:
    """One row: the given tokens plus one padded token holding nan/inf; old log-probs −1."""
    old = f64([-1.0] * len(ratios) + [NAN])
    logprobs = (old + f64([math.log(r) for r in ratios] + [INF])).detach().requires_grad_()
    mask = f64([1.0] * len(ratios) + [0.0])
    return logprobs, old, f64([*adv, NAN]), mask


def test_ppo_policy_loss_clipped_value():
    """ε = 0.2, both tokens clipped.
    A = 1,  ρ = 1.5: −Aρ = −1.5, −A·clip(ρ) = −1.2,             max = −1.2 (clipped term).
    A = −2, ρ = 0.5: −Aρ = 1.0,  −A·clip(ρ) = 2·0.8 = 1.6,      max = 1.6 (clipped term).
    loss = (−1.2 + 1.6)/2 = 0.2, clipfrac = 1, ratio_mean = (1.5 + 0.5)/2 = 1,
    approx_kl = ½·(ln²1.5 + ln²0.5)/2 = ½·(0.1644019 + 0.4804530)/2 = 0.1612137.
    Both tokens clipped: the gradient wrt logprobs is 0 everywhere."""
    logprobs, old, adv, mask = policy_case([1.0, -2.0], [1.5, 0.5])
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    assert_close(loss, scalar(0.2))
    assert_close(stats["clipfrac"], scalar(1.0))
    assert_close(stats["ratio_mean"], scalar(1.0))
    assert_close(stats["approx_kl"], scalar(0.25 * (math.log(1.5) ** 2 + math.log(0.5) ** 2)))
    loss.backward()
    assert_close(logprobs.grad, f64([0.0, 0.0, 0.0]))


def test_ppo_policy_loss_unclipped_value():
    """ε = 0.2, neither token clipped.
    A = 1,  ρ = 0.5: −Aρ = −0.5, −A·clip(ρ) = −0.8,             max = −0.5 (unclipped term).
    A = −2, ρ = 1.1: −Aρ = 2.2,  −A·clip(ρ) = 2.2 (in range),  max = 2.2 (tie: not clipped).
    loss = (−0.5 + 2.2)/2 = 0.85, clipfrac = 0, ratio_mean = 0.8.
    Gradient of (−A·ρ)/N wrt log π is −A·ρ/N: (−1·0.5/2, 2·1.1/2) = (−0.25, 1.1); pad 0.
    Descent raises log π where A > 0 and lowers it where A < 0."""
    logprobs, old, adv, mask = policy_case([1.0, -2.0], [0.5, 1.1])
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    assert_close(loss, scalar(0.85))
    assert_close(stats["clipfrac"], scalar(0.0))
    assert_close(stats["ratio_mean"], scalar(0.8))
    loss.backward()
    assert_close(logprobs.grad, f64([-0.25, 1.1, 0.0]))


def test_ppo_policy_loss_at_old_policy_is_minus_mean_advantage():
    """ρ = 1 everywhere: both terms are −A, so loss = −masked_mean(A), clipfrac 0, approx_kl 0,
    ratio_mean 1; the gradient is −A/N on real tokens, pushing log π up exactly where A > 0."""
    adv, mask = random_batch(4)
    old, _ = random_batch(5)
    logprobs = old.clone().requires_grad_()
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask)
    assert_close(loss, -masked_mean(adv, mask))
    assert_close(stats["clipfrac"], scalar(0.0))
    assert_close(stats["approx_kl"], scalar(0.0))
    assert_close(stats["ratio_mean"], scalar(1.0))
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    assert_close(logprobs.grad, -adv * mask / mask.sum())


# --------------------------------------------------------------------------------------------- value loss


def test_value_loss_unclipped_value():
    """c = 0.2. V = 1.1, V_old = 1, R = 2: (V − R)² = 0.81; V_clip = 1 + clip(0.1) = 1.1, same 0.81.
    loss = ½·0.81 = 0.405, vf_clipfrac = 0; gradient wrt V = ½·2·(V − R) = −0.9."""
    values = f64([1.1, NAN]).requires_grad_()
    loss, stats = value_loss(values, f64([1.0, INF]), f64([2.0, NAN]), f64([1, 0]), clip_range_value=0.2)
    assert_close(loss, scalar(0.405))
    assert_close(stats["vf_clipfrac"], scalar(0.0))
    loss.backward()
    assert_close(values.grad, f64([-0.9, 0.0]))


def test_value_loss_clipped_value():
    """c = 0.2. V = 1.5, V_old = 1, R = 2: (V − R)² = 0.25; V_clip = 1 + clip(0.5) = 1.2,
    (1.2 − 2)² = 0.64; max = 0.64 (clipped term). loss = ½·0.64 = 0.32, vf_clipfrac = 1; V_clip is
    constant in V, so the gradient is 0. With the unclipped token above in the same row:
    loss = ½·(0.81 + 0.64)/2 = 0.3625, vf_clipfrac = 0.5."""
    values = f64([1.5]).requires_grad_()
    loss, stats = value_loss(values, f64([1.0]), f64([2.0]), f64([1]), clip_range_value=0.2)
    assert_close(loss, scalar(0.32))
    assert_close(stats["vf_clipfrac"], scalar(1.0))
    loss.backward()
    assert_close(values.grad, f64([0.0]))
    both, both_stats = value_loss(f64([1.5, 1.1]), f64([1.0, 1.0]), f64([2.0, 2.0]), f64([1, 1]))
    assert_close(both, scalar(0.3625))
    assert_close(both_stats["vf_clipfrac"], scalar(0.5))


# ------------------------------------------------------------------------------------------ KL controllers


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.value == 0.05


def test_adaptive_kl_controller_values():
    """β = 0.1, target 6, horizon 10000, n_steps 256.
    Above target, KL = 9: e = clip(9/6 − 1 = 0.5) = 0.2; β = 0.1·(1 + 0.2·256/10000) = 0.1·1.00512 = 0.100512.
    Then below, KL = 3: e = clip(3/6 − 1 = −0.5) = −0.2; β = 0.100512·(1 − 0.00512) = 0.09999737856.
    Unclipped from 0.1, KL = 6.6, n_steps 1000: e = 0.1; β = 0.1·(1 + 0.1·1000/10000) = 0.101.
    At target, KL = 6: e = 0, β unchanged."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 256)
    assert ctl.value == pytest.approx(0.100512, rel=1e-12)
    ctl.update(3.0, 256)
    assert ctl.value == pytest.approx(0.09999737856, rel=1e-12)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(6.6, 1000)
    assert ctl.value == pytest.approx(0.101, rel=1e-12)
    ctl.update(6.0, 1000)
    assert ctl.value == pytest.approx(0.101, rel=1e-12)


def test_adaptive_kl_controller_rejects_bad_target():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)
