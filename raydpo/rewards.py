"""Ground-truth reward functions by name (text → score), for PPO-GT, Best-of-N and evaluation."""

from __future__ import annotations

from collections.abc import Callable

from raydpo.errors import ConfigError


def _vader() -> Callable[[list[str]], list[float]]:
    from raydpo.tasks.sentiment import SentimentReward

    return SentimentReward()


REWARDS: dict[str, Callable[[], Callable[[list[str]], list[float]]]] = {"vader": _vader}


def get_reward(name: str) -> Callable[[list[str]], list[float]]:
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; allowed: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]()
