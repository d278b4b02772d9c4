"""The statistics of win-rate evaluation: intervals on win rates, mean rewards and KL to the reference.

The DPO paper (Rafailov et al., 2023, arXiv 2305.18290) compares methods two ways:

- by *win rate* against a baseline (Sec. 6.2–6.3: GPT-4 judges, per prompt, which of two completions is
  better; TL;DR DPO ≈ 61% vs PPO ≈ 57% against the reference summaries), and
- by *reward against KL to the reference* (Sec. 6.1, Fig. 2: each point is one policy's mean ground-truth
  reward and its sequence-level KL(π‖π_ref); the better method has the higher frontier).

Everything here is pure Python + numpy, so it is unit-tested without Ray. Normal quantiles come from the
standard library (`statistics.NormalDist`), not scipy.

One outcome per prompt, from A's point of view: 1.0 = A wins, 0.0 = B wins, 0.5 = tie (half credit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import NamedTuple

import numpy as np


class Interval(NamedTuple):
    """A point estimate with a two-sided confidence interval [low, high], from n observations."""

    estimate: float
    low: float
    high: float
    n: int


def _z(confidence: float) -> float:
    """Two-sided normal quantile z = Φ⁻¹(1 − α/2), α = 1 − confidence (1.959964 for 95%)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _finite_1d(values: Sequence[float], name: str) -> np.ndarray:
    """`values` as a 1-D float64 array; ValueError if it is not 1-D or holds NaN/inf."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


def _same_length(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{names[0]} and {names[1]} must have the same length, got {len(a)} and {len(b)}")


def win_rate(outcomes: Sequence[float], confidence: float = 0.95) -> Interval:
    """Win rate of A over B with the Wilson score interval (Wilson, 1927, JASA 22:209–212).

    With p̂ = mean(outcomes), n = len(outcomes), z = Φ⁻¹(1 − α/2):

        center = (p̂ + z²/2n) / (1 + z²/n)
        half   = z · sqrt(p̂(1 − p̂)/n + z²/4n²) / (1 + z²/n)
        [low, high] = [center − half, center + half] ∩ [0, 1]

    Unlike the Wald interval p̂ ± z·sqrt(p̂(1−p̂)/n) it never leaves [0, 1], is not degenerate at p̂ = 0 or 1,
    and keeps near-nominal coverage for small n (Brown, Cai & DasGupta, 2001, Statistical Science 16:101–133).

    Ties count as half a win and the n outcomes are treated as Bernoulli trials with mean p̂. A tie has
    variance 0 where a Bernoulli trial has p(1 − p), so the true variance of the mean is at most p̂(1 − p̂)/n:
    with ties the interval is slightly conservative (wider than needed), never too narrow.
    """
    x = _finite_1d(outcomes, "outcomes")
    if len(x) == 0:
        raise ValueError("win_rate needs at least one outcome, got none")
    if np.any((x < 0.0) | (x > 1.0)):
        raise ValueError("outcomes must lie in [0, 1] (1 = A wins, 0 = B wins, 0.5 = tie)")
    n, p, z = len(x), float(x.mean()), _z(confidence)
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denom
    # At p̂ = 0 (or 1) center == half exactly; rounding may leave ±1e-17, so pin the bound.
    low = 0.0 if p == 0.0 else max(0.0, center - half)
    high = 1.0 if p == 1.0 else min(1.0, center + half)
    return Interval(p, low, high, n)


def outcomes_from_scores(a: Sequence[float], b: Sequence[float], tie_tol: float = 0.0) -> list[float]:
    """Per-prompt outcomes from scores of A and B: 1.0 if a > b + tol, 0.0 if b > a + tol, else 0.5 (tie).

    `a[i]` and `b[i]` score the two completions for prompt i (a judge's or a reward model's score);
    `tie_tol` ≥ 0 treats near-equal scores as ties.
    """
    if tie_tol < 0 or not math.isfinite(tie_tol):
        raise ValueError(f"tie_tol must be finite and >= 0, got {tie_tol}")
    xa, xb = _finite_1d(a, "a"), _finite_1d(b, "b")
    _same_length(xa, xb, ("a", "b"))
    out = np.full(len(xa), 0.5)
    out[xa > xb + tie_tol] = 1.0
    out[xb > xa + tie_tol] = 0.0
    return out.tolist()


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean with a normal-approximation interval: x̄ ± z · s/√n, s the sample std (ddof = 1), n ≥ 2.

    t-free: the normal quantile z is used instead of Student's t_{n−1}, which is accurate for the
    hundreds of prompts of an evaluation set and slightly too narrow for a handful.
    """
    x = _finite_1d(values, "values")
    if len(x) < 2:
        raise ValueError(f"mean_interval needs at least 2 values for a standard deviation, got {len(x)}")
    mean, half = float(x.mean()), _z(confidence) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x))


def kl_from_samples(policy_logps: Sequence[float], ref_logps: Sequence[float]) -> Interval:
    """Sequence-level KL(π‖π_ref) from samples y_i ~ π(·|x_i), with a 95% normal interval.

        KL(π‖π_ref) = E_{y~π}[log π(y|x) − log π_ref(y|x)]  ≈  (1/n) Σ_i (log π(y_i|x_i) − log π_ref(y_i|x_i))

    `policy_logps[i]` and `ref_logps[i]` are the summed token log-probs of the same sampled completion under
    the policy and the reference (the sequence-level KL of the DPO paper's Fig. 2). This is the unbiased
    "k1" estimator (Schulman, 2020, "Approximating KL Divergence"): single terms can be negative, their mean
    converges to the KL ≥ 0. The interval is `mean_interval` of the per-sample log-ratios (n ≥ 2).
    """
    pi, ref = _finite_1d(policy_logps, "policy_logps"), _finite_1d(ref_logps, "ref_logps")
    _same_length(pi, ref, ("policy_logps", "ref_logps"))
    return mean_interval(pi - ref)


# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30; beyond, the normal 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def across_seeds(values: Sequence[float]) -> Interval:
    """Mean over seeds with a 95% Student t interval across them (n = seeds; width 0 for one seed)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("across_seeds needs at least one value")
    mean = float(x.mean())
    if len(x) == 1:
        return Interval(mean, mean, mean, 1)
    t = _T975[len(x) - 2] if len(x) - 1 <= len(_T975) else 1.96
    half = t * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x))
