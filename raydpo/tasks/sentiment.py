"""Controlled sentiment generation, offline and CPU-sized.

Provenance: Rafailov et al. 2023, "Direct Preference Optimization" (arXiv 2305.18290), §6.1. There,
x is a prefix of an IMDb movie review, the policy must continue it with positive sentiment, and a
pre-trained sentiment classifier (siebert/sentiment-roberta-large-english) is the ground-truth reward
that both labels the preference pairs and scores the trained policies (reward against KL frontier).

Our version keeps the shape of the task and drops every download:

- the corpus is synthetic: short review-like texts (8–25 words, 1–2 sentences) drawn from a
  template grammar over small word lists (`make_corpus`); about a third positive, a third negative,
  a third mixed or neutral, so the reward over the corpus is centred near 0 with a wide spread;
- prompts are the neutral openings every corpus text starts with (`make_prompts`), so a model
  trained on the corpus has seen each prefix continued both ways;
- the ground-truth reward is VADER's compound score in [-1, 1] (Hutto & Gilbert 2014), a lexicon
  and rule model: deterministic, fast on CPU, no weights (`SentimentReward`);
- preference pairs are labelled from that reward by Bradley–Terry sampling, as a noisy human
  annotator would (`label_pairs`).

Another module trains the tiny LM on the corpus and samples completions (raydpo.models.generation).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable

from raydpo.models.rewards import SentimentReward  # noqa: F401 (the task's ground truth, defined with the rewards)

# Neutral openings: (text, kind). kind "np" ends on a singular subject and takes " was <adj>";
# kind "adj" already ends on a verb that takes an adjective. Each is 2–5 words and can go either way.
OPENINGS: tuple[tuple[str, str], ...] = (
    ("the movie was", "adj"),
    ("this film is", "adj"),
    ("the acting was", "adj"),
    ("watching this film was", "adj"),
    ("i found the story", "adj"),
    ("the characters were", "adj"),
    ("the visual effects were", "adj"),
    ("i thought the acting", "np"),
    ("the plot of this film", "np"),
    ("frankly, the ending", "np"),
    ("the soundtrack", "np"),
    ("in my opinion the director", "np"),
    ("overall, this movie", "np"),
    ("as for the script", "np"),
    ("the first half", "np"),
    ("the dialogue", "np"),
    ("the last scene", "np"),
    ("the cast of this film", "np"),
)
PROMPTS: tuple[str, ...] = tuple(text for text, _ in OPENINGS)

# Sentiment words are taken from VADER's lexicon (valence in brackets) so the reward sees them;
# the negatives lean strong because VADER's positive valences are larger on average.
POSITIVE = (
    "great", "wonderful", "brilliant", "enjoyable", "beautiful", "fun", "superb", "excellent",
    "charming", "clever", "amazing", "lovely", "delightful", "fantastic", "perfect",
)  # fmt: skip  # valences 1.9 (enjoyable) .. 3.1 (great, superb)
NEGATIVE = (
    "terrible", "boring", "awful", "dull", "bad", "weak", "disappointing", "stupid", "horrible",
    "painful", "annoying", "messy", "the worst i have seen", "a total mess", "a bad joke",
)  # fmt: skip  # valences -1.3 (boring) .. -3.1 (worst)
NEUTRAL = (
    "long", "about what i expected", "quite ordinary", "a typical summer release", "unlike the trailer",
    "different from the book", "shot in black and white", "mostly set in one house",
)  # fmt: skip  # none of these words is in VADER's lexicon
INTENSIFIERS = ("", "", "", "really ", "quite ", "extremely ", "very ")
FILLERS = (
    "", "", "from start to finish", "for most of the film", "in almost every scene", "if you ask me",
    "for a film of its type", "from the first minute", "by the end",
)  # fmt: skip
ASPECTS = ("the ending", "the music", "the pacing", "the script", "the acting", "the camera work")
SECOND = {
    "pos": ("i loved it.", "i would happily watch it again.", "what a wonderful surprise.",
            "highly recommended.", "i enjoyed every minute of it.", "a real delight for the whole family."),
    "neg": ("i hated it.", "what a waste of time.", "i was bored the whole time.", "a real disappointment.",
            "i want those two hours back, it was awful.", "sadly a bad film."),
    "neu": ("it runs about two hours.", "i saw it with my brother last week.", "it is based on a book.",
            "the theater was half full.", "it came out last year.", "it was shown on a sunday night."),
}  # fmt: skip
# Review classes and their weights: a third positive, a third negative, a third mixed or neutral.
CLASSES = (("pos", 2), ("neg", 2), ("mixed", 1), ("neu", 1))


def _adj(rng: random.Random, words: tuple[str, ...]) -> str:
    word = rng.choice(words)
    # Intensifiers only before single adjectives: "very the worst i have seen" is not English.
    return (rng.choice(INTENSIFIERS) if " " not in word else "") + word


def _draw(rng: random.Random) -> str:
    """One review from the grammar: OPENING [was] ADJ [and ADJ | , but ASPECT was ADJ] [FILLER]. [S2]"""
    opening, kind = rng.choice(OPENINGS)
    cls = rng.choices([c for c, _ in CLASSES], weights=[w for _, w in CLASSES])[0]
    head = opening + (" was " if kind == "np" else " ")
    if cls == "mixed":  # VADER weighs the clause after "but" more, so the order sets the sign
        first, second = rng.sample([POSITIVE, NEGATIVE], 2)
        body = f"{_adj(rng, first)}, but {rng.choice(ASPECTS)} was {_adj(rng, second)}"
        tail_cls = "neu"
    else:
        words = {"pos": POSITIVE, "neg": NEGATIVE, "neu": NEUTRAL}[cls]
        body = _adj(rng, words)
        if rng.random() < 0.3:
            body += " and " + _adj(rng, words)
        tail_cls = cls
    filler = rng.choice(FILLERS)
    sentence = head + body + (f" {filler}" if filler else "") + "."
    if rng.random() < 0.6:
        sentence += " " + rng.choice(SECOND[tail_cls])
    return sentence


def make_corpus(n: int = 20000, seed: int = 0) -> list[str]:
    """`n` synthetic reviews, 8–25 words each, deterministic in `seed`.

    Draws that fall outside the word bounds are redrawn from the same generator, so the output
    still depends only on (n, seed). Every text starts with one of `PROMPTS`.
    """
    rng = random.Random(seed)
    texts = []
    while len(texts) < n:
        text = _draw(rng)
        if 8 <= len(text.split()) <= 25:
            texts.append(text)
    return texts


def make_prompts(n: int, seed: int) -> list[str]:
    """`n` neutral openings from `PROMPTS`: distinct when n ≤ len(PROMPTS), else drawn with replacement."""
    rng = random.Random(seed)
    if n <= len(PROMPTS):
        return rng.sample(PROMPTS, n)
    return rng.choices(PROMPTS, k=n)


def bradley_terry(r_a: float, r_b: float, temperature: float) -> float:
    """P(a ≻ b) = σ((r_a − r_b) / temperature); temperature = 0 is the hard limit (0.5 on ties)."""
    diff = float(r_a) - float(r_b)
    if temperature == 0 or diff == 0:
        return 0.5 if diff == 0 else float(diff > 0)
    z = diff / temperature
    # Written per sign so a tiny temperature (huge |z|) never overflows math.exp.
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def label_pairs(
    prompts: list[str],
    completions: list[list[str]],
    rewards: list[list[float]],
    seed: int,
    temperature: float = 0.1,
) -> list[dict]:
    """Turn K scored completions per prompt into preference pairs, labelled by a simulated annotator.

    For prompt i, its K completions are shuffled (seeded by (seed, i)) and paired disjointly:
    K//2 pair slots k = 0..K//2-1. A slot is skipped when its two completions are the same text or
    either is empty after strip. The preferred completion is drawn from the Bradley–Terry model
    (Bradley & Terry 1952, "Rank analysis of incomplete block designs"; the DPO paper's Eq. 1):

        P(a ≻ b) = σ((r_a − r_b) / temperature)

    so temperature → 0 always prefers the higher reward and a large temperature is a coin flip.
    temperature = 0 is accepted as that limit (ties broken by a fair coin).

    Returns rows {"id": f"{i}-{k}", "prompt", "chosen", "rejected", "chosen_reward",
    "rejected_reward"}; completions are kept verbatim (leading space included).
    """
    if not len(prompts) == len(completions) == len(rewards):
        raise ValueError("prompts, completions and rewards must have the same length")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rows = []
    for i, (prompt, comps, rews) in enumerate(zip(prompts, completions, rewards)):
        if len(comps) != len(rews):
            raise ValueError(f"prompt {i}: {len(comps)} completions but {len(rews)} rewards")
        # Per-prompt generator: one prompt's pairs do not depend on how many others came before.
        rng = random.Random(f"{seed}:{i}")
        order = list(range(len(comps)))
        rng.shuffle(order)
        for k in range(len(order) // 2):
            a, b = order[2 * k], order[2 * k + 1]
            if comps[a] == comps[b] or not comps[a].strip() or not comps[b].strip():
                continue
            w, lo = (a, b) if rng.random() < bradley_terry(rews[a], rews[b], temperature) else (b, a)
            rows.append({
                "id": f"{i}-{k}", "prompt": prompt, "chosen": comps[w], "rejected": comps[lo],
                "chosen_reward": float(rews[w]), "rejected_reward": float(rews[lo]),
            })  # fmt: skip
    return rows


def corpus_stats(texts: list[str], reward: Callable[[list[str]], list[float]]) -> dict:
    """Summary of `reward` over `texts`: mean, std (population), min, max, and the shares scored
    positive (> 0.05) and negative (< -0.05), VADER's conventional neutral band."""
    scores = reward(texts)
    if not scores:
        raise ValueError("corpus_stats needs at least one text")
    return {
        "mean": statistics.fmean(scores),
        "std": statistics.pstdev(scores),
        "min": min(scores),
        "max": max(scores),
        "positive_share": sum(s > 0.05 for s in scores) / len(scores),
        "negative_share": sum(s < -0.05 for s in scores) / len(scores),
    }
