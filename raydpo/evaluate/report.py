"""Tables and plots of an evaluation: results table, reward–KL frontier, win rates with error bars, win
rate against sampling temperature."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raydpo.evaluate.frontier import Point, envelope_at
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
            cells = [name, f"{t:g}", fmt_interval(m.get("reward/gt_mean")), fmt_interval(m["kl"])]
            cells += [fmt_interval(m.get(f"winrate/vs_{b}")) for b in baselines]
            rows.append(cells)
    return format_table(cols, rows)


def plot_frontier(results: dict, path: Path, series: dict[str, str] | None = None) -> Path | None:
    """Mean reward against KL to the reference, one series per method (`plot_frontier_points`): a
    point per policy and temperature. `series` maps policy names to series labels (e.g. every DPO β of
    one loss to "DPO (sigmoid)"); a policy not named is a series of its own."""
    series = series or {}
    pts: dict[str, list[Point]] = {}
    for n, by_t in results.items():
        for m in by_t.values():
            if "reward/gt_mean" in m:
                pts.setdefault(series.get(n, n), []).append((m["kl"].estimate, m["reward/gt_mean"].estimate))
    if not pts:
        return None
    return plot_frontier_points({label: [p] for label, p in pts.items()}, path)


def plot_frontier_points(points: dict[str, list[list[Point]]], path: Path, title: str = "reward–KL frontier",
                         xmax: float | None = None) -> Path:  # fmt: skip
    """The DPO paper's Fig. 2 (left): `points[label]` holds, per seed, that method's (KL, reward)
    points. Every point is a faint dot; the bold line is the method's frontier (frontier.envelope:
    mixtures included, flat after its best point), averaged over seeds, with the range across seeds
    shaded when there are several. x runs from 0 to `xmax` (default: 1.1 × the 90th percentile of
    all KLs); the title counts the points beyond it."""
    plt = pyplot()
    every = [k for seeds in points.values() for pts in seeds for k, _ in pts]
    if xmax is None:
        xmax = 1.1 * float(np.quantile(every, 0.9)) if every else 1.0
    xmax = xmax if xmax > 0 else 1.0
    xs = np.linspace(0.0, xmax, 400)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (label, seeds) in enumerate(points.items()):
        color = f"C{i % 10}"
        flat = [p for pts in seeds for p in pts]
        ax.scatter([k for k, _ in flat], [r for _, r in flat], s=16, alpha=0.35, color=color, linewidths=0)
        curves = np.array([[envelope_at(pts, x) for x in xs] for pts in seeds])  # (seeds, 400)
        ok = np.isfinite(curves).all(axis=0)  # where every seed's frontier is defined
        if not ok.any():
            continue
        ax.plot(xs[ok], curves[:, ok].mean(axis=0), color=color, linewidth=2.5, label=label)
        if len(seeds) > 1:
            ax.fill_between(
                xs[ok], curves[:, ok].min(axis=0), curves[:, ok].max(axis=0), color=color, alpha=0.12
            )
    beyond = sum(k > xmax for k in every)
    ax.set_xlim(0, xmax)
    ax.set_xlabel("KL(π ‖ π_ref), nats per sample")
    ax.set_ylabel("mean ground-truth reward")
    note = f" ({beyond} point{'s' * (beyond > 1)} beyond KL {xmax:.3g} not shown)" if beyond else ""
    ax.set_title(title + note, fontsize="medium")
    ax.legend(fontsize="small", loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_winrate_vs_temperature(
    curves: dict[str, list[tuple[float, object]]], baseline: str, path: Path
) -> Path:
    """The DPO paper's Fig. 2 (right) / Fig. 3: each method's win rate against `baseline` as a
    function of the sampling temperature, the interval (an `Interval`'s low–high) shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, pts) in enumerate(curves.items()):
        pts = sorted(pts, key=lambda p: p[0])
        ts = [t for t, _ in pts]
        ax.plot(ts, [iv.estimate for _, iv in pts], marker="o", color=f"C{i % 10}", label=label)
        ax.fill_between(
            ts, [iv.low for _, iv in pts], [iv.high for _, iv in pts], color=f"C{i % 10}", alpha=0.15
        )
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel(f"win rate vs {baseline} (ties = ½)")
    ax.set_title(f"win rate against {baseline} by sampling temperature")
    ax.legend(fontsize="small", loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_winrates(results: dict, baselines: list[str], path: Path) -> Path | None:
    """Win rate of each policy against each baseline, with 95% intervals: one panel per baseline,
    one horizontal bar per policy (a bar per temperature when there are several), policies sorted
    best first by win rate against the first baseline at the first temperature (the eval config's)."""
    temps = sorted({t for by_t in results.values() for t in by_t})
    panels = [b for b in baselines if any(f"winrate/vs_{b}" in m for by_t in results.values()
                                          for m in by_t.values())]  # fmt: skip
    if not panels:
        return None
    t0 = next(t for by_t in results.values() for t in by_t)  # results keep the config's temperature order

    def key(n: str) -> tuple:  # compared with the first baseline first, best first; then the rest
        iv = results[n].get(t0, {}).get(f"winrate/vs_{panels[0]}")
        return (0, -iv.estimate) if iv else (1, 0.0)

    names = sorted(results, key=key)  # stable: ties keep the config's order
    plt = pyplot()
    height = 0.8 / len(temps)  # the temperatures' bars share a policy's row
    width = 0.6 + 0.07 * max(map(len, names)) + 3.8 * len(panels)  # room for the names, then the panels
    rows_high = 0.32 * len(names) * max(1.0, 0.6 * len(temps))  # grows with the policies (and temperatures)
    fig, axes = plt.subplots(1, len(panels), sharey=True, squeeze=False, figsize=(width, 1.3 + rows_high))
    for ax, b in zip(axes[0], panels):
        for j, t in enumerate(temps):
            rows = [(i, results[n][t][f"winrate/vs_{b}"]) for i, n in enumerate(names)
                    if f"winrate/vs_{b}" in results[n].get(t, {})]  # fmt: skip
            ys = [i - 0.4 + height * (j + 0.5) for i, _ in rows]
            xs = [iv.estimate for _, iv in rows]
            err = [[iv.estimate - iv.low for _, iv in rows], [iv.high - iv.estimate for _, iv in rows]]
            ax.barh(ys, xs, height=height * 0.9, xerr=err, capsize=2, label=f"temperature {t:g}",
                    error_kw={"elinewidth": 1, "ecolor": "0.25"})  # fmt: skip
        for i, n in enumerate(names):
            if n == b:
                ax.text(0.02, i, "(baseline)", va="center", fontsize="small", color="gray")
        ax.axvline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_title(f"vs {b}")
        ax.set_xlabel("win rate (ties = ½)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].set_ylim(len(names) - 0.5, -0.5)  # best at the top
    if len(temps) > 1:
        axes[0][-1].legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
