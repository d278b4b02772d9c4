"""The offline controlled-sentiment task: corpus, prompts, VADER reward, Bradley–Terry labelling."""

import math

import pytest

from raydpo.tasks.sentiment import (
    PROMPTS,
    SentimentReward,
    bradley_terry,
    corpus_stats,
    label_pairs,
    make_corpus,
    make_prompts,
)


@pytest.fixture(scope="module")
def reward():
    return SentimentReward()


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(5000, seed=0)


def test_corpus_is_deterministic_per_seed_and_differs_across_seeds():
    assert make_corpus(300, seed=3) == make_corpus(300, seed=3)
    assert make_corpus(300, seed=3) != make_corpus(300, seed=4)
    # A longer corpus extends a shorter one drawn from the same seed (one generator, in order).
    assert make_corpus(400, seed=3)[:300] == make_corpus(300, seed=3)


def test_corpus_shape(corpus):
    assert len(corpus) == 5000
    counts = [len(t.split()) for t in corpus]
    assert min(counts) >= 8 and max(counts) <= 25
    assert all(t == t.lower() and t.endswith(".") for t in corpus)
    assert all(t.startswith(PROMPTS) for t in corpus)
    assert len(set(corpus)) > 2000  # varied, not a handful of templates repeated


def test_corpus_sentiment_is_mixed(corpus, reward):
    """Mean near 0 and a wide spread: the LM sees every opening continued both ways."""
    stats = corpus_stats(corpus, reward)
    assert set(stats) == {"mean", "std", "min", "max", "positive_share", "negative_share"}
    assert abs(stats["mean"]) < 0.15
    assert stats["std"] > 0.4
    assert stats["positive_share"] > 0.2 and stats["negative_share"] > 0.2
    assert stats["min"] < -0.8 and stats["max"] > 0.8


def test_every_prompt_opens_corpus_texts_both_ways(corpus, reward):
    scores = reward(corpus)
    for p in PROMPTS:
        mine = [s for t, s in zip(corpus, scores) if t.startswith(p + " ")]
        assert mine, p
        assert max(mine) > 0.05 and min(mine) < -0.05, p


def test_prompts(reward):
    assert len(PROMPTS) >= 15 and len(set(PROMPTS)) == len(PROMPTS)
    assert all(2 <= len(p.split()) <= 5 for p in PROMPTS)
    assert reward(list(PROMPTS)) == [0.0] * len(PROMPTS)  # neutral openings: no VADER lexicon word
    assert make_prompts(10, seed=1) == make_prompts(10, seed=1)
    assert len(set(make_prompts(10, seed=1))) == 10  # distinct while n <= number of openings
    many = make_prompts(100, seed=2)
    assert len(many) == 100 and set(many) <= set(PROMPTS)


def test_reward_on_hand_picked_sentences(reward):
    """VADER compound (measured with vaderSentiment 3.3.2):
    "i loved it, wonderful." → +0.8225 (loved 2.9, wonderful 2.7);
    "what a waste of time, i hated it." → -0.7906 (waste -1.8, hated -3.2);
    "it runs about two hours." → 0.0 (no lexicon word)."""
    assert reward.name == "vader"
    pos, neg, neu = reward(
        ["i loved it, wonderful.", "what a waste of time, i hated it.", "it runs about two hours."]
    )
    assert pos == pytest.approx(0.8225) and pos > 0.5
    assert neg == pytest.approx(-0.7906) and neg < -0.5
    assert neu == pytest.approx(0.0, abs=0.05)
    assert reward([" a boring, awful mess."])[0] < -0.5  # leading space as in completions
    assert reward([]) == []


def _scored(n_prompts, k, seed=0):
    """n_prompts prompts with k distinct completions each; reward of completion j is j / k."""
    prompts = [f"p{i}" for i in range(n_prompts)]
    comps = [[f" c{i}-{j}" for j in range(k)] for i in range(n_prompts)]
    rews = [[j / k for j in range(k)] for _ in range(n_prompts)]
    return prompts, comps, rews


def test_label_pairs_counts_keys_and_determinism():
    prompts, comps, rews = _scored(5, 4)
    rows = label_pairs(prompts, comps, rews, seed=0)
    assert len(rows) == 5 * 2  # K=4 → 2 disjoint pairs per prompt
    assert set(rows[0]) == {"id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}
    assert [r["id"] for r in rows[:2]] == ["0-0", "0-1"]
    for r in rows:
        i = int(r["id"].split("-")[0])
        assert r["prompt"] == prompts[i]
        assert r["chosen"].startswith(" c") and r["chosen"] != r["rejected"]  # leading space kept
        assert r["chosen_reward"] == rews[i][comps[i].index(r["chosen"])]
    for i in range(5):  # disjoint: each completion of a prompt is used at most once
        used = [c for r in rows if r["prompt"] == prompts[i] for c in (r["chosen"], r["rejected"])]
        assert len(used) == len(set(used)) == 4
    assert label_pairs(prompts, comps, rews, seed=0) == rows
    assert label_pairs(prompts, comps, rews, seed=1) != rows
    odd = label_pairs(["p"], [[" a", " b", " c"]], [[0.1, 0.2, 0.3]], seed=0)
    assert len(odd) == 1  # K=3 → one pair, one completion left over


def test_label_pairs_skips_identical_and_empty():
    rows = label_pairs(["p", "q"], [[" same", " same"], [" x", "   "]], [[0.1, 0.9], [0.5, 0.1]], seed=0)
    assert rows == []


def test_label_pairs_low_temperature_always_prefers_higher_reward():
    prompts, comps, rews = _scored(200, 4)
    rows = label_pairs(prompts, comps, rews, seed=0, temperature=1e-6)
    assert len(rows) == 400
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    hard = label_pairs(prompts, comps, rews, seed=0, temperature=0.0)  # the limit itself
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in hard)


def test_label_pairs_high_temperature_is_a_coin_flip():
    """Rewards differ by at most 0.75, so at T=100 P(higher wins) = σ(≤0.0075) ≤ 0.502. Over 2000
    pairs the count of higher-wins is Binomial(2000, ~0.5): sd ≈ 22.4, so 1000 ± 5 sd = [888, 1112]."""
    prompts, comps, rews = _scored(1000, 4)
    rows = label_pairs(prompts, comps, rews, seed=0, temperature=100.0)
    wins = sum(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    assert len(rows) == 2000
    assert abs(wins - 1000) < 5 * math.sqrt(2000 * 0.25)


def test_label_pairs_matches_bradley_terry_probability():
    """Gap 0.1 at T=0.1: P(higher chosen) = σ(1) = 0.7311. Over 4000 pairs sd ≈ 28; allow 5 sd."""
    n = 4000
    rows = label_pairs(["p"] * n, [[" lo", " hi"]] * n, [[0.0, 0.1]] * n, seed=0, temperature=0.1)
    wins = sum(r["chosen"] == " hi" for r in rows)
    expected = n / (1 + math.exp(-1))
    assert abs(wins - expected) < 5 * math.sqrt(n * 0.7311 * 0.2689)


def test_bradley_terry_by_hand():
    """σ(1) = 1 / (1 + e^-1) = 0.7311; symmetric; the T=0 limit is a step with 0.5 on ties;
    |z| = 1e6 must not overflow."""
    assert bradley_terry(0.1, 0.0, 0.1) == pytest.approx(0.7311, abs=1e-4)
    assert bradley_terry(0.0, 0.1, 0.1) == pytest.approx(1 - 0.7311, abs=1e-4)
    assert bradley_terry(0.3, 0.3, 0.1) == 0.5
    assert (bradley_terry(1.0, 0.0, 0.0), bradley_terry(0.0, 1.0, 0.0), bradley_terry(0.2, 0.2, 0.0)) == (
        1,
        0,
        0.5,
    )
    assert bradley_terry(-1.0, 0.0, 1e-6) == 0.0 and bradley_terry(1.0, 0.0, 1e-6) == 1.0


def test_label_pairs_rejects_bad_input():
    with pytest.raises(ValueError):
        label_pairs(["p"], [[" a", " b"]], [[0.1]], seed=0)
    with pytest.raises(ValueError):
        label_pairs(["p"], [[" a", " b"]], [[0.1, 0.2]], seed=0, temperature=-1)
