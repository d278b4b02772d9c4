"""Tables and plots of an evaluation: results table, reward–KL frontier, win rates with error bars."""

from __future__ import annotations

from pathlib import Path

from raydpo.reporting import format_table, pyplot


def fmt_interval(iv) -> str:
    """`estimate [low, high]` to 3 decimals; "-" for a missing interval."""
    return "-" if iv is None else f"{iv.estimate:.3f} [{iv.low:.3f}, {iv.high:.3f}]"


def results_table(results: dict, baselines: list[str]) -> str:
    """One line per policy and temperature: mean reward, KL, win rate vs each baseline (95% intervals)."""
    cols = ["method", "temp", "reward", "kl"] + [f"win vs {b}" for b in baselines]
    rows = []
    for name, by_t in results.items():
        for t, m in sorted(by_t.items()):
            cells = [name, f"{t:g}", fmt_interval(m.get("reward/mean")), fmt_interval(m["kl"])]
            cells += [fmt_interval(m.get(f"winrate/vs_{b}")) for b in baselines]
            rows.append(cells)
    return format_table(cols, rows)


def plot_frontier(results: dict, path: Path, series: dict[str, str] | None = None) -> Path | None:
    """Mean reward against KL to the reference: one series per method, a point per policy and temperature.

    `series` maps policy names to series labels (e.g. every DPO β of one loss to "DPO (sigmoid)");
    a policy not named is a series of its own.
    """
    series = series or {}
    pts: dict[str, list[tuple[float, float]]] = {}
    for n, by_t in results.items():
        for m in by_t.values():
            if "reward/mean" in m:
                pts.setdefault(series.get(n, n), []).append((m["kl"].estimate, m["reward/mean"].estimate))
    if not pts:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, p in sorted(pts.items()):
        p.sort()
        ax.plot([x for x, _ in p], [y for _, y in p], marker="o", label=label)
    ax.set_xlabel("KL(π ‖ π_ref), nats per sample")
    ax.set_ylabel("mean ground-truth reward")
    ax.set_title("reward–KL frontier")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_winrates(results: dict, baselines: list[str], path: Path) -> Path | None:
    """Win rate of each method against each baseline (first temperature), with 95% error bars."""
    bars = [(n, b, m[f"winrate/vs_{b}"]) for n, by_t in results.items() for b in baselines
            for t, m in sorted(by_t.items())[:1] if f"winrate/vs_{b}" in m]  # fmt: skip
    if not bars:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(bars))
    ys = [iv.estimate for _, _, iv in bars]
    err = [[y - iv.low for y, (_, _, iv) in zip(ys, bars)], [iv.high - y for y, (_, _, iv) in zip(ys, bars)]]
    ax.bar(xs, ys, yerr=err, capsize=4)
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_xticks(list(xs), [f"{n}\nvs {b}" for n, b, _ in bars])
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate (ties = ½)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
