"""Ground-truth reward functions by name (text → score), for PPO-GT, Best-of-N and evaluation."""

from __future__ import annotations

from collections.abc import Callable

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from raydpo.errors import ConfigError


class SentimentReward:
    """Ground-truth reward: VADER's compound score in [-1, 1] of each completion text.

    Callers pass completions only (not prompt + completion): the prompts are neutral by design, so
    the score measures what the policy wrote. "i loved it, wonderful." → +0.8225; "what a waste of
    time, i hated it." → -0.7906; a sentence with no lexicon word ("it runs about two hours.") → 0.0.
    """

    name = "vader"

    def __init__(self) -> None:
        self._analyzer = SentimentIntensityAnalyzer()  # loads the lexicon file once

    def __call__(self, texts: list[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(t)["compound"]) for t in texts]


REWARDS: dict[str, Callable[[], Callable[[list[str]], list[float]]]] = {"vader": SentimentReward}


def get_reward(name: str) -> Callable[[list[str]], list[float]]:
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; allowed: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]()
