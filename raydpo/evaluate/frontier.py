"""Reward–KL frontiers and the seed-level comparison of two methods' frontiers (DPO paper, §6.1, Fig. 2).

A point is (KL to the reference, mean ground-truth reward) of one evaluated policy: a run's final
model or one of its checkpoints. A method's *frontier* is the best reward it reaches within a KL
budget x, mixtures of its policies included:

    f(x) = max { Σ_i w_i r_i  :  Σ_i w_i k_i ≤ x,  w ≥ 0,  Σ_i w_i = 1 }

A mixture (sample policy i with probability w_i) has reward exactly Σ w_i r_i and, KL being convex,
KL at most Σ w_i k_i, so every value of f is reachable. f is the upper concave envelope of the
points, flat to the right of the best one, and −∞ left of the smallest KL. `envelope` returns its
vertices; a point below a chord between two others (dominated by a mixture) is not one of them.

Several seeds: each seed s gives one frontier per method, f_A,s and f_B,s. `compare_frontiers`
measures, per seed, the mean gap between them over a common KL window [lo, hi],

    Δ_s = (1 / (hi − lo)) ∫_lo^hi (f_A,s(x) − f_B,s(x)) dx      (exact: both are piecewise linear)

(the area between the envelopes divided by the window's width, in reward units), and a paired
bootstrap over seeds of mean_s Δ_s gives a 95% percentile interval. The verdict: "reproduced" when
the interval lies above 0 (A's frontier higher), "not reproduced" when it lies below, else
"inconclusive"; with fewer than two seeds there is no interval across seeds and the verdict is
"inconclusive". With three seeds the percentile interval's ends are the smallest and largest Δ_s
(each single-seed resample has probability 1/27 > 2.5%), so "reproduced" means every seed agrees.

Pure Python + numpy: unit-tested without Ray.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from raydpo.evaluate.metrics import Interval

Point = tuple[float, float]  # (KL to the reference, mean reward)


def envelope(points: Sequence[Point]) -> list[Point]:
    """Vertices of the frontier, by increasing KL: the upper concave hull of `points` from the
    leftmost (highest reward among equal KLs) up to the first point of highest reward. Empty for no points."""
    pts = sorted({(float(k), float(r)) for k, r in points}, key=lambda p: (p[0], -p[1]))
    hull: list[Point] = []
    for p in pts:
        if hull and p[0] == hull[-1][0]:
            continue  # same KL, lower reward: never on the envelope
        # pop while the last vertex lies on or below the chord from the one before it to p
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) >= 0:
            hull.pop()
        hull.append(p)
    best = max(range(len(hull)), key=lambda i: (hull[i][1], -i), default=-1)
    return hull[: best + 1]


def _cross(o: Point, a: Point, b: Point) -> float:
    """> 0 when o → a → b turns left (a lies below the chord o–b)."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def envelope_at(points: Sequence[Point], kl: float) -> float:
    """f(kl): the best reward reachable at KL ≤ `kl` from these points and their mixtures
    (−inf when no point has KL ≤ `kl`)."""
    return _at(envelope(points), kl)


def _at(env: list[Point], x: float) -> float:
    if not env or x < env[0][0]:
        return -math.inf
    for (k1, r1), (k2, r2) in zip(env, env[1:]):
        if x <= k2:
            return r1 + (r2 - r1) * (x - k1) / (k2 - k1)
    return env[-1][1]


def mean_gap(a: Sequence[Point], b: Sequence[Point], lo: float, hi: float) -> float:
    """(1 / (hi − lo)) ∫_lo^hi (f_a − f_b) dx, exactly (trapezoids between the merged vertices).
    ValueError when either frontier is undefined somewhere in [lo, hi] or the window is empty."""
    if not hi > lo:
        raise ValueError(f"empty KL window [{lo}, {hi}]")
    ea, eb = envelope(a), envelope(b)
    xs = sorted({lo, hi, *(k for k, _ in ea + eb if lo < k < hi)})
    gaps = [_at(ea, x) - _at(eb, x) for x in xs]
    if not all(math.isfinite(g) for g in gaps):
        raise ValueError(f"a frontier has no point at KL ≤ {lo}: the window [{lo}, {hi}] is not covered")
    area = sum((x2 - x1) * (g1 + g2) / 2 for x1, x2, g1, g2 in zip(xs, xs[1:], gaps, gaps[1:]))
    return area / (hi - lo)


def bootstrap_mean(values: Sequence[float], n_boot: int = 4000, seed: int = 0) -> Interval:
    """Mean of `values` (one per seed) with a 95% percentile bootstrap interval over seeds."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("bootstrap_mean needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return Interval(float(x.mean()), float(low), float(high), len(x))


def verdict(iv: Interval) -> str:
    """'reproduced' (interval above 0), 'not reproduced' (below 0) or 'inconclusive' (it holds 0, or
    one seed only)."""
    if iv.n < 2:
        return "inconclusive"
    if iv.low > 0:
        return "reproduced"
    if iv.high < 0:
        return "not reproduced"
    return "inconclusive"


class FrontierCheck(NamedTuple):
    verdict: str  # reproduced | not reproduced | inconclusive
    gap: Interval  # mean over seeds of Δ_s, 95% paired-bootstrap interval over seeds
    per_seed: list[float]  # Δ_s, in seed order
    window: tuple[float, float]  # the KL window [lo, hi]


def compare_frontiers(a_by_seed: Sequence[Sequence[Point]], b_by_seed: Sequence[Sequence[Point]],
                      n_boot: int = 4000, seed: int = 0) -> FrontierCheck:  # fmt: skip
    """Is A's frontier above B's? Seeds are paired by position (seed s of A with seed s of B).

    The KL window is common to every seed: lo = the largest first KL of any frontier (each must be
    defined there; give every seed the starting policy's point, KL 0, to start at 0), hi = the
    smaller of the two methods' largest KLs over all seeds (the range both explored)."""
    if len(a_by_seed) != len(b_by_seed) or not a_by_seed:
        raise ValueError(f"need the same number of seeds (≥ 1) for both, got {len(a_by_seed)} and "
                         f"{len(b_by_seed)}")  # fmt: skip
    if any(not pts for pts in [*a_by_seed, *b_by_seed]):
        raise ValueError("every seed needs at least one point per method")
    lo = max(min(k for k, _ in pts) for pts in [*a_by_seed, *b_by_seed])
    hi = min(max(k for pts in a_by_seed for k, _ in pts), max(k for pts in b_by_seed for k, _ in pts))
    gaps = [mean_gap(a, b, lo, hi) for a, b in zip(a_by_seed, b_by_seed)]
    iv = bootstrap_mean(gaps, n_boot, seed)
    return FrontierCheck(verdict(iv), iv, gaps, (lo, hi))
