"""Text tables and the matplotlib set-up shared by every report (evaluation, sweep, demo).

Pure Python: imports nothing from raydpo, so any layer may use it.
"""

from __future__ import annotations


def format_table(columns: list[str], rows: list[list[str]], *, markdown: bool = False) -> str:
    """A header line, a line of dashes, then one line per row; every column left-justified to its widest cell.

    Plain (default): cells separated by two spaces, e.g.

        method  kl
        ------  -----
        dpo     0.123

    `markdown=True`: the same padding as a Markdown table, `| method | kl    |` (it reads as plain text too).
    """
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    if markdown:
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    else:
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in rows])


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (files only, no display needed)."""
    # deferred: heavy, only for plots
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
