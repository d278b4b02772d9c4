"""Tests for raydpo.evaluate.metrics: Wilson intervals by hand, coverage, mean intervals, KL.

Hand-derived Wilson interval, 60 wins out of 100 at 95% (z = Φ⁻¹(0.975) = 1.959964, z² = 3.841459):

    p̂ = 0.6,  z²/n = 0.03841459,  z²/2n = 0.01920729,  z²/4n² = 0.00009604
    center = (0.6 + 0.01920729) / 1.03841459 = 0.61920729 / 1.03841459 = 0.59630065
    half   = 1.959964 · sqrt(0.6·0.4/100 + 0.00009604) / 1.03841459
           = 1.959964 · sqrt(0.00249604) / 1.03841459 = 1.959964 · 0.04996039 / 1.03841459 = 0.09429806
    interval = (0.59630065 − 0.09429806, 0.59630065 + 0.09429806) = (0.5020, 0.6906)

Edge cases, n = 10 (z²/n = 0.38414588, denominator 1.38414588):

    0 of 10:  center = 0.19207294 / 1.38414588 = 0.13876640 = half  →  (0, 0.2775)
    10 of 10: by symmetry (1 − 0.2775, 1) = (0.7225, 1)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from raydpo.evaluate.metrics import (
    Interval,
    kl_from_samples,
    mean_interval,
    outcomes_from_scores,
    win_rate,
)

Z95 = 1.959963984540054


def test_wilson_60_of_100_matches_hand_derivation():
    iv = win_rate([1.0] * 60 + [0.0] * 40)
    assert isinstance(iv, Interval)
    assert iv.estimate == pytest.approx(0.6) and iv.n == 100
    assert round(iv.low, 4) == 0.5020 and round(iv.high, 4) == 0.6906
    assert iv.low == pytest.approx(0.59630065 - 0.09429806, abs=1e-8)
    assert iv.high == pytest.approx(0.59630065 + 0.09429806, abs=1e-8)


def test_wilson_all_losses_and_all_wins_stay_in_unit_interval():
    none = win_rate([0.0] * 10)
    assert none.estimate == 0.0 and none.low == 0.0 and none.high == pytest.approx(0.27753280, abs=1e-8)
    every = win_rate([1.0] * 10)
    assert every.estimate == 1.0 and every.high == 1.0 and every.low == pytest.approx(0.72246720, abs=1e-8)


def test_ties_count_as_half():
    iv = win_rate([0.5] * 10)
    assert iv.estimate == 0.5 and iv.n == 10
    # Same p̂ = 0.5 as 5 wins + 5 losses, hence the same (conservative for ties) interval, symmetric about 0.5.
    assert iv == win_rate([1.0] * 5 + [0.0] * 5)
    assert iv.low == pytest.approx(1.0 - iv.high)
    assert win_rate([1.0, 0.5, 0.0, 0.5]).estimate == 0.5


def test_wilson_narrows_with_confidence_and_n():
    wide, narrow = win_rate([1.0] * 6 + [0.0] * 4, 0.99), win_rate([1.0] * 6 + [0.0] * 4, 0.8)
    assert wide.low < narrow.low < narrow.high < wide.high
    small, big = win_rate([1.0] * 6 + [0.0] * 4), win_rate([1.0] * 60 + [0.0] * 40)
    assert big.high - big.low < small.high - small.low


@pytest.mark.parametrize(
    "outcomes, confidence, match",
    [([], 0.95, "at least one"), ([1.5], 0.95, r"\[0, 1\]"), ([float("nan")], 0.95, "finite"),
     ([1.0], 1.0, "confidence"), ([1.0], 0.0, "confidence")],
)  # fmt: skip
def test_win_rate_rejects_bad_input(outcomes, confidence, match):
    with pytest.raises(ValueError, match=match):
        win_rate(outcomes, confidence)


def test_wilson_coverage_near_nominal():
    """2000 experiments of n = 50 Bernoulli(0.3): the 95% interval covers 0.3 in 93%–97.5% of them."""
    rng = np.random.default_rng(1234)
    draws = (rng.random((2000, 50)) < 0.3).astype(float)
    covered = sum(iv.low <= 0.3 <= iv.high for iv in map(win_rate, draws))
    assert 0.93 <= covered / 2000 <= 0.975


def test_outcomes_from_scores_ties_and_tolerance():
    a, b = [3.0, 1.0, 2.0, 2.05, 1.95], [1.0, 3.0, 2.0, 2.0, 2.0]
    assert outcomes_from_scores(a, b) == [1.0, 0.0, 0.5, 1.0, 0.0]
    assert outcomes_from_scores(a, b, tie_tol=0.1) == [1.0, 0.0, 0.5, 0.5, 0.5]
    assert outcomes_from_scores([], []) == []


def test_outcomes_from_scores_length_mismatch_and_bad_tolerance():
    with pytest.raises(ValueError, match="got 3 and 2"):
        outcomes_from_scores([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="tie_tol"):
        outcomes_from_scores([1.0], [1.0], tie_tol=-0.1)


def test_mean_interval_hand_computation():
    """[1, 2, 3, 4, 5]: mean 3, s² = 10/4 = 2.5, s/√n = sqrt(2.5/5) = 1/√2 = 0.70710678,
    half = 1.959964 · 0.70710678 = 1.38590382 → (1.61409618, 4.38590382)."""
    iv = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert iv.estimate == 3.0 and iv.n == 5
    assert iv.low == pytest.approx(1.61409618, abs=1e-8) and iv.high == pytest.approx(4.38590382, abs=1e-8)
    assert mean_interval([1.0, 2.0, 3.0, 4.0, 5.0], 0.5).high == pytest.approx(3 + 0.6744898 / math.sqrt(2))


@pytest.mark.parametrize("values", [[], [1.0]])
def test_mean_interval_needs_two_values(values):
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval(values)


def test_kl_identical_logps_is_zero():
    logps = [-12.5, -3.0, -7.25]
    assert kl_from_samples(logps, logps) == Interval(0.0, 0.0, 0.0, 3)


def test_kl_is_mean_log_ratio():
    """Log-ratios (−1 − −2, −2 − −2, −3 − −5, −4 − −4) = (1, 0, 2, 0): mean 0.75, s² = 2.75/3."""
    iv = kl_from_samples([-1.0, -2.0, -3.0, -4.0], [-2.0, -2.0, -5.0, -4.0])
    half = Z95 * math.sqrt(2.75 / 3) / 2
    assert iv.estimate == pytest.approx(0.75) and iv.n == 4
    assert iv.low == pytest.approx(0.75 - half) and iv.high == pytest.approx(0.75 + half)
    with pytest.raises(ValueError, match="policy_logps and ref_logps"):
        kl_from_samples([-1.0, -2.0], [-1.0])
