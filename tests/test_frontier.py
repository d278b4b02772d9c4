"""Frontiers (evaluate/frontier.py) and the seed-level comparison of two methods' frontiers on
hand-made points: envelopes with mixtures, the mean gap between two frontiers, the verdicts (the
demo's report of it: tests/test_demo.py)."""

import math

import pytest

from raydpo.evaluate.frontier import compare_frontiers, envelope, envelope_at, mean_gap
from raydpo.evaluate.metrics import across_seeds


def test_envelope_is_the_concave_hull_flat_after_its_best_point():
    pts = [(0.0, 0.0), (2.0, 1.0), (4.0, 1.2)]
    assert envelope(pts) == pts
    assert envelope_at(pts, 1.0) == pytest.approx(0.5)  # mixture of SFT and the KL-2 policy
    assert envelope_at(pts, 3.0) == pytest.approx(1.1)
    assert envelope_at(pts, 10.0) == pytest.approx(1.2)  # KL ≤ 10 reaches the best point
    assert envelope_at([(1.0, 0.3)], 0.5) == -math.inf  # nothing at KL ≤ 0.5


def test_a_point_dominated_by_a_mixture_is_not_on_the_envelope():
    """(1, 0.1) lies below the chord from (0, 0) to (2, 1), whose value at KL 1 is 0.5: mixing the KL-0
    and KL-2 policies half and half beats it, so the envelope skips it. (3, 0.9) and (4, 1.0) lie
    right of the best point (2, 1): the envelope stays flat at 1 there."""
    pts = [(3.0, 0.9), (1.0, 0.1), (0.0, 0.0), (2.0, 1.0), (4.0, 1.0), (2.0, 0.2)]
    assert envelope(pts) == [(0.0, 0.0), (2.0, 1.0)]
    assert envelope_at(pts, 1.0) == pytest.approx(0.5)
    assert envelope_at(pts, 3.5) == pytest.approx(1.0)
    # a point on the chord (collinear) is not a vertex either, and changes no value
    assert envelope([(0.0, 0.0), (1.0, 0.5), (2.0, 1.0)]) == [(0.0, 0.0), (2.0, 1.0)]


def test_mean_gap_is_the_area_between_the_envelopes_over_the_window():
    """f_a rises from (0, 0) to (2, 1): x/2. f_b rises from (0, 0) to (1, 0.5), then stays at 0.5. On
    [0, 1] they are equal; on [1, 2] the gap is x/2 − 0.5, from 0 to 0.5: area 0.25. Over the window
    [0, 2] (width 2) the mean gap is 0.125; the other way round −0.125."""
    a, b = [(0.0, 0.0), (2.0, 1.0)], [(0.0, 0.0), (1.0, 0.5)]
    assert mean_gap(a, b, 0.0, 2.0) == pytest.approx(0.125)
    assert mean_gap(b, a, 0.0, 2.0) == pytest.approx(-0.125)
    assert mean_gap(a, b, 1.0, 2.0) == pytest.approx(0.25)  # the same area over a window of width 1
    with pytest.raises(ValueError, match="not covered"):
        mean_gap([(0.5, 0.0)], b, 0.0, 1.0)  # f_a undefined below KL 0.5


def _seed(dpo_reward: float, ppo_reward: float):
    """One seed: both methods start at SFT (0, 0) and reach their reward at KL 4."""
    return [(0.0, 0.0), (4.0, dpo_reward)], [(0.0, 0.0), (4.0, ppo_reward)]


@pytest.mark.parametrize(
    ("rewards", "expected"),
    [
        ([(0.9, 0.7), (0.85, 0.7), (0.95, 0.75)], "reproduced"),  # DPO above in every seed
        ([(0.6, 0.8), (0.65, 0.8), (0.6, 0.85)], "not reproduced"),  # DPO below in every seed
        ([(0.9, 0.7), (0.6, 0.8), (0.8, 0.75)], "inconclusive"),  # seeds disagree: the interval holds 0
        ([(0.9, 0.7)], "inconclusive"),  # one seed: no interval across seeds
    ],
)
def test_seed_level_check_verdicts(rewards, expected):
    seeds = [_seed(d, p) for d, p in rewards]
    check = compare_frontiers([d for d, _ in seeds], [p for _, p in seeds])
    assert check.verdict == expected
    assert check.window == (0.0, 4.0)
    # the gap of one seed is half the reward difference at KL 4 (both lines start at 0)
    assert check.per_seed == pytest.approx([(d - p) / 2 for d, p in rewards])
    assert check.gap.low <= check.gap.estimate <= check.gap.high


def test_overlapping_seed_intervals_are_inconclusive_even_when_the_mean_favours_dpo():
    """Mean gap +0.033 > 0, but one seed of three goes the other way: the bootstrap interval holds 0."""
    seeds = [_seed(0.9, 0.7), _seed(0.9, 0.7), _seed(0.6, 0.8)]
    check = compare_frontiers([d for d, _ in seeds], [p for _, p in seeds])
    assert check.gap.estimate > 0 and check.gap.low < 0 < check.gap.high
    assert check.verdict == "inconclusive"


def test_across_seeds_uses_student_t():
    """Three seeds 1, 2, 3: mean 2, s = 1, t_{0.975,2} = 4.303: 2 ± 4.303/√3 = 2 ± 2.484."""
    iv = across_seeds([1.0, 2.0, 3.0])
    assert (iv.estimate, iv.n) == (2.0, 3)
    assert iv.low == pytest.approx(2 - 4.303 / math.sqrt(3), abs=1e-6)
    assert iv.high == pytest.approx(2 + 4.303 / math.sqrt(3), abs=1e-6)
    assert across_seeds([0.7]) == (0.7, 0.7, 0.7, 1)
