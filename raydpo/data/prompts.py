"""Prompt lists for on-policy training (PPO) and evaluation: one reader, bad rows counted."""

from __future__ import annotations

from raydpo.data.readers import iter_rows
from raydpo.errors import DataError


def read_prompts(source: str, column: str = "prompt", *, fmt: str = "auto", split: str = "train",
                 max_rows: int | None = None, max_bad_fraction: float = 0.05) -> list[str]:  # fmt: skip
    """The non-empty `column` strings of `source`; rows without one are counted, and the read fails
    (DataError, naming the source and column) when none is usable or too many are bad."""
    prompts, bad = [], 0
    for _, row in iter_rows(source, fmt, split, max_rows):
        ok = isinstance(row, dict) and isinstance(row.get(column), str) and bool(row[column].strip())
        if ok:
            prompts.append(row[column])
        bad += not ok
    total = len(prompts) + bad
    if not prompts or bad / max(total, 1) > max_bad_fraction:
        raise DataError(
            f"{source}: {bad} of {total} rows have no usable '{column}' string "
            f"(max bad fraction {max_bad_fraction})"
        )
    return prompts
