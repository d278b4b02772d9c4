"""The end of a sweep: a table of trials sorted by the metric, plots, and the parent MLflow run's summary.

Plots (PNG, logged to the parent run): the metric against β with one line per loss variant, and a
β × learning-rate heatmap of the metric (when both are swept). With `seeds: N`, `configs.csv` and
the printed table give per point of the space (the swept values but the seed) the metric's mean over
its seeds with a 95% Student t interval across them.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from raydpo.evaluate.metrics import across_seeds
from raydpo.reporting import format_table as _format_table
from raydpo.reporting import pyplot
from raydpo.tracking import RunLogger, close_stopped_children, tracking_uri


def trial_rows(sweep, results) -> list[dict]:
    """One row per trial: its id, swept values, last metric value, steps done, status."""
    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial": m.get("trial_id") or Path(r.path).name}
        row.update({k: _value(r.config.get(k)) for k in sweep.search})
        row[sweep.metric] = m.get(sweep.metric, math.nan)
        row["step"] = m.get("step", 0)
        row["status"] = "ERROR" if r.error else "OK"
        rows.append(row)
    sign = -1 if sweep.mode == "max" else 1
    return sorted(rows, key=lambda x: (math.isnan(x[sweep.metric]), sign * _num(x[sweep.metric])))


def _value(v):
    return v if isinstance(v, (int, float, str)) or v is None else str(v)


def _num(v) -> float:
    return v if isinstance(v, (int, float)) and not math.isnan(v) else math.inf


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    cols = list(rows[0])
    return _format_table(cols, [[_fmt(r[c]) for c in cols] for r in rows])


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_metric_vs_beta(rows: list[dict], metric: str, path: Path) -> Path | None:
    if not rows or "loss.beta" not in rows[0]:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(str(r.get("loss.name", "loss")), []).append(r)
    for name, rs in sorted(groups.items()):
        pts = sorted(
            (r["loss.beta"], _mean([x[metric] for x in rs if x["loss.beta"] == r["loss.beta"]])) for r in rs
        )
        xs, ys = zip(*dict(pts).items())
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("β")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against β per loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_beta_lr_heatmap(rows: list[dict], metric: str, path: Path) -> Path | None:
    if not rows or "loss.beta" not in rows[0] or "optim.lr" not in rows[0]:
        return None
    plt = pyplot()
    betas = sorted({r["loss.beta"] for r in rows})
    lrs = sorted({r["optim.lr"] for r in rows})
    grid = [[_mean([r[metric] for r in rows if r["loss.beta"] == b and r["optim.lr"] == lr]) for b in betas]
            for lr in lrs]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(betas)), [f"{b:g}" for b in betas])
    ax.set_yticks(range(len(lrs)), [f"{x:.1e}" for x in lrs])
    ax.set_xlabel("β")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{metric} (mean over other keys)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if isinstance(x, (int, float)) and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def seed_rows(rows: list[dict], keys: list[str], metric: str) -> list[dict]:
    """Per point of the space (values of `keys` but train.seed), over its finished trials: the
    metric's mean across seeds, its 95% Student t interval, and the number of seeds."""
    keys = [k for k in keys if k != "train.seed"]
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r["status"] == "OK" and _num(r[metric]) != math.inf:
            groups.setdefault(tuple(r[k] for k in keys), []).append(r[metric])
    out = []
    for values, xs in groups.items():
        iv = across_seeds(xs)
        stats = {f"{metric} mean": iv.estimate, "ci_low": iv.low, "ci_high": iv.high, "seeds": iv.n}
        out.append({**dict(zip(keys, values)), **stats})
    return out


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        w.writeheader()
        w.writerows(rows)
    return path


def summarize(sweep, base_cfg, results, parent_run_id, root: Path, log=print) -> dict:
    """Table, CSV and plots under <sweep dir>/summary, logged to the parent run; printed table."""
    rows = trial_rows(sweep, results)
    out = root / "summary"
    out.mkdir(parents=True, exist_ok=True)
    files = [
        write_csv(rows, out / "trials.csv"),
        plot_metric_vs_beta(rows, sweep.metric, out / "metric_vs_beta.png"),
        plot_beta_lr_heatmap(rows, sweep.metric, out / "beta_lr_heatmap.png"),
    ]
    table = format_table(rows)
    if sweep.seeds:
        by_config = seed_rows(rows, list(sweep.search), sweep.metric)
        sign = -1 if sweep.mode == "max" else 1
        by_config.sort(key=lambda r: sign * r[f"{sweep.metric} mean"])
        files.append(write_csv(by_config, out / "configs.csv"))
        table += f"\n\nover {sweep.seeds} seeds (mean, 95% t interval across seeds):\n" + format_table(
            by_config
        )
    (out / "trials.txt").write_text(table + "\n")
    failed = [r for r in rows if r["status"] == "ERROR"]
    if parent_run_id:
        uri = tracking_uri(base_cfg.tracking)
        logger = RunLogger(uri, parent_run_id)
        for f in filter(None, files):
            logger.log_artifact(f, "summary")
        logger.log_table(rows, "summary/trials.json")
        best = rows[0][sweep.metric] if rows and not failed else math.nan
        if not math.isnan(best):
            logger.log_metrics({f"best/{sweep.metric}": best}, step=0)
        close_stopped_children(uri, parent_run_id)
        logger.finish("FAILED" if failed else "FINISHED")
    log(table)
    if failed:
        log(f"{len(failed)} trial(s) failed; `raydpo sweep ... --resume` re-runs them from their checkpoints")
    return {"rows": rows, "failed": len(failed), "summary_dir": str(out), "parent_run_id": parent_run_id}
