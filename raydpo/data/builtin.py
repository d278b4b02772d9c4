"""`builtin:tiny-prefs`: a small, deterministic preference set, so `raydpo train` runs with no download.

The pairs imitate the DPO paper's controlled sentiment task in miniature: the prompt opens a movie
review, the chosen continuation is positive and the rejected one negative. Word choices are drawn
from small lists with `random.Random(seed)`, so the same (n, seed) always gives the same rows.
Responses start with a space so that `prompt + chosen` tokenizes as the two texts would alone.
"""

from __future__ import annotations

import random

MOVIES = (
    "The Quiet Harbor",
    "Seven Red Lanterns",
    "A Map of Winter",
    "The Last Orchard",
    "Signals from Home",
    "Paper Kingdoms",
    "The Glass Detective",
    "Midnight at the Depot",
)
OPENINGS = ("Review of {movie}:", "My thoughts on {movie}:", "{movie}, a review:", "Watched {movie} tonight.")
POSITIVE = ("great", "wonderful", "moving", "delightful", "brilliant", "charming")
NEGATIVE = ("dull", "tedious", "clumsy", "boring", "forgettable", "messy")
SUBJECTS = ("film", "story", "cast", "script", "soundtrack", "ending")
PRAISE = ("I loved every minute.", "I would watch it again.", "Highly recommended.", "A real treat.")
COMPLAINTS = ("I nearly fell asleep.", "I want my time back.", "Skip this one.", "A real letdown.")


def tiny_prefs(n: int = 64, seed: int = 0) -> list[dict]:
    """`n` standard-format rows `{"id", "prompt", "chosen", "rejected"}` (all strings), fixed by `seed`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = rng.choice(OPENINGS).format(movie=rng.choice(MOVIES))
        subject = rng.choice(SUBJECTS)
        chosen = f" A {rng.choice(POSITIVE)} {subject}. {rng.choice(PRAISE)}"
        rejected = f" A {rng.choice(NEGATIVE)} {subject}. {rng.choice(COMPLAINTS)}"
        rows.append({"id": f"tiny-{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows
