"""`raydpo demo`: the DPO paper's controlled-sentiment comparison (§6.1, Fig. 2 left) end to end.

On embedded defaults only (a local Ray on 127.0.0.1, a SQLite MLflow store in the demo folder, the
built-in sentiment task; nothing to download):

  1. prepare the task: corpus, tokenizer, SFT policy, VADER-labelled preference pairs
  2. a reward model on those pairs (for PPO and Best-of-N)
  3. a Ray Tune sweep of DPO over loss variants × β, one Ray Train run per trial
  4. the baselines: Preferred-FT, PPO against the reward model (one run per KL coefficient),
     PPO-GT against the ground-truth reward
  5. `raydpo eval` of everything (SFT, Best-of-N included) on the held-out prompts, judged by the
     ground-truth reward: mean reward, KL to the SFT policy, win rates vs SFT and vs PPO
  6. the results table, the reward–KL frontier plot, the check of the paper's finding, and the
     command that opens the MLflow UI on these runs

Every stage's output is kept in the demo folder; running the demo again reuses finished stages
(an interrupted sweep is resumed), so only the missing work is done.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import yaml

from raydpo.config import TrackingConfig, build_config
from raydpo.engine.session import start_ray
from raydpo.errors import UserError
from raydpo.evaluate.report import fmt_interval as _iv
from raydpo.evaluate.run import run_eval
from raydpo.methods import train
from raydpo.reporting import format_table
from raydpo.sweep import run_sweep
from raydpo.tasks.prepare import SIZES as TASK_SIZES
from raydpo.tasks.prepare import prepare
from raydpo.tracking import KIND_TAG, RunLogger, find_or_create_run, run_id_for, tracking_uri

# Per size: the task size, the DPO grid, the baselines' budgets and the eval's sample count.
SIZES = {
    "tiny": {
        "task": "tiny",
        "losses": ["sigmoid", "ipo", "hinge"],
        "betas": [0.1],
        "dpo": {"epochs": 2, "lr": 1e-3},
        "preferred_ft_epochs": 1,
        "reward_model_epochs": 4,
        "reward_model_eval_every": 9,
        "ppo": {"steps": 6, "kl_coefs": [0.05], "rollout_batch_size": 16},
        "best_of_n": 4,
        "eval_samples": 1,
    },
    "full": {
        "task": "full",
        "losses": ["sigmoid", "ipo", "hinge"],
        "betas": [0.05, 0.1, 0.25, 1.0],
        "dpo": {"epochs": 1, "lr": 3e-4},
        "preferred_ft_epochs": 2,
        "reward_model_epochs": 2,
        "reward_model_eval_every": 50,
        "ppo": {"steps": 30, "kl_coefs": [0.1, 0.05, 0.3], "rollout_batch_size": 32},
        "best_of_n": 16,
        "eval_samples": 2,
    },
}  # fmt: skip


class Clock:
    """Stage lines with the time since the demo started: `[demo 03:12] 3/6 DPO sweep ...`."""

    def __init__(self, log, stages: int = 6):
        self.log, self.stages, self.start = log, stages, time.monotonic()

    def __call__(self, msg: str, stage: int | None = None) -> None:
        s = int(time.monotonic() - self.start)
        where = f"{stage}/{self.stages} " if stage else ""
        self.log(f"[demo {s // 60:02d}:{s % 60:02d}] {where}{msg}")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


def check_settings(root: Path, settings: dict) -> None:
    """A demo folder holds one set of settings: finished stages are reused only for the same ones."""
    path = root / "demo.json"
    if path.exists():
        if json.loads(path.read_text()) != json.loads(json.dumps(settings)):
            raise UserError(f"{root} holds a demo run with other settings (see {path}); "
                            "pass another --dir, or remove that folder to start over")  # fmt: skip
        return
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise UserError(f"{root} is not empty and holds no demo.json; pass another --dir")
    path.write_text(json.dumps(settings, indent=1))


def _done(run_dir: Path) -> bool:
    return (run_dir / "final" / "config.json").exists()


def _train(cfg: dict, clock: Clock, stage: int, what: str) -> str:
    """One Ray Train run (any method), skipped when its final model is already exported."""
    rc = build_config(cfg, f"demo {what}")
    if _done(rc.run_dir):
        clock(f"{what}: done earlier ({rc.run_dir / 'final'})", stage)
        return str(rc.run_dir / "final")
    clock(f"{what} ...", stage)
    return train(rc, log=lambda m: clock(f"  {m}"))["final_model"]


def _base(manifest: dict, root: Path, tracking: dict, seed: int) -> dict:
    return {
        "model": {"policy": manifest["sft_model"]},
        "data": {"source": manifest["pairs"], "max_length": 48, "max_prompt_length": 16},
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "train": {"batch_size": 16, "seed": seed, "output_dir": str(root / "runs"), "log_every": 10},
        "scaling": {"cpus_per_worker": 1},  # one thread per worker: numbers independent of the core count
        "tracking": tracking,
    }


def _with(base: dict, **over) -> dict:
    out = json.loads(json.dumps(base))
    for section, values in over.items():
        out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


def run_dpo_sweep(spec: dict, base: dict, root: Path, clock: Clock, stage: int) -> list[dict]:
    """The DPO sweep (every trial runs to the end: FIFO); returns one row per trial with its model."""
    sweep = {
        "name": "dpo-sweep",
        "base": _with(base, run_name="dpo-sweep", method="dpo",
                      optim={"lr": spec["dpo"]["lr"]}, train={"epochs": spec["dpo"]["epochs"]}),
        "search": {"loss.name": {"grid": spec["losses"]}, "loss.beta": {"grid": spec["betas"]}},
        "metric": "rewards/accuracies",
        "mode": "max",
        "max_concurrent_trials": 2,
        "trial": {"num_workers": 1, "cpus_per_worker": 1},
    }  # fmt: skip
    path = root / "dpo-sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    sweep_root = Path(base["train"]["output_dir"]) / "dpo-sweep"
    resume = (sweep_root / "tune").exists()
    n = len(spec["losses"]) * len(spec["betas"])
    clock(f"DPO sweep: {' / '.join(spec['losses'])} × β {spec['betas']} = {n} trials"
          f"{' (resuming)' if resume else ''} ...", stage)  # fmt: skip
    out = run_sweep(str(path), resume=resume, log=lambda m: clock(f"  {m}") if "\n" not in m else None)
    if out["failed"]:
        raise UserError(f"{out['failed']} DPO trial(s) failed; see {out['summary_dir']}")
    rows = []
    for r in out["rows"]:
        final = sweep_root / "trials" / r["trial"] / "final"
        rows.append({"loss": r["loss.name"], "beta": float(r["loss.beta"]), "model": str(final)})
    return sorted(rows, key=lambda r: (spec["losses"].index(r["loss"]), r["beta"]))


def eval_config(root: Path, manifest: dict, policies: dict, series: dict, spec: dict, tracking: dict) -> Path:
    cfg = {
        "name": "eval",
        "prompts": manifest["eval_prompts"],
        "reference": manifest["sft_model"],
        "policies": policies,
        "baselines": ["sft", "ppo"],
        "series": series,
        "judge": {"kind": "reward", "name": "vader"},
        "reward": "vader",
        "temperatures": [1.0],
        "n": spec["eval_samples"],
        "output_dir": str(root / "runs"),
        "tracking": tracking,
    }
    path = root / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the results


def results_rows(results: dict, meta: dict) -> list[dict]:
    """One row per evaluated policy (temperature 1): method, loss, β, reward, KL, win rates."""
    rows = []
    for name, m in meta.items():
        r = results[name][1.0]
        wins = {"win_vs_sft": r.get("winrate/vs_sft"), "win_vs_ppo": r.get("winrate/vs_ppo")}
        rows.append({"policy": name, **m, "reward": r.get("reward/gt_mean"), "kl": r["kl"], **wins})
    return rows


def rank_dpo_trials(rows: list[dict], dpo_rows: list[dict], tracking: TrackingConfig) -> list[str]:
    """Rank the sweep's trials by what the demo measures, win rate against SFT (the sweep's own
    metric, the last batch's reward accuracy, cannot separate them): each trial's MLflow run gets
    `winrate/vs_sft` (+ interval), the sweep's parent run `best/winrate/vs_sft` and the best trial's
    name as a tag. Returns the ranking lines."""
    by_name = {r["policy"]: r for r in rows}
    ranked = []
    for d in dpo_rows:
        row = by_name.get(f"dpo-{d['loss']}-b{d['beta']:g}")
        if row and row["win_vs_sft"] is not None:
            ranked.append((row["win_vs_sft"], d))
    ranked.sort(key=lambda x: -x[0].estimate)
    uri = tracking_uri(tracking)
    for iv, d in ranked:
        run_id = run_id_for(tracking, Path(d["model"]).parent)
        if run_id:
            RunLogger(uri, run_id).log_metrics(
                {
                    "winrate/vs_sft": iv.estimate,
                    "winrate/vs_sft_ci_low": iv.low,
                    "winrate/vs_sft_ci_high": iv.high,
                },
                0,
            )
    parent = run_id_for(tracking, Path(dpo_rows[0]["model"]).parents[2]) if ranked else None
    if parent:
        best_iv, best = ranked[0]
        logger = RunLogger(uri, parent)
        logger.log_metrics({"best/winrate/vs_sft": best_iv.estimate}, 0)
        logger.set_tags({"raydpo.best_trial": f"{best['loss']}-b{best['beta']:g}"})
    return [f"{d['loss']} β {d['beta']:g}: win vs SFT {_iv(iv)}" for iv, d in ranked]


def format_results(rows: list[dict]) -> str:
    """A Markdown table (it reads as plain text too)."""
    head = ["method", "loss", "β", "reward [95% CI]", "KL [95% CI]", "win vs SFT [95% CI]",
            "win vs PPO [95% CI]"]  # fmt: skip
    cells = [[r["method"], r["loss"] or "-", "-" if r["beta"] is None else f"{r['beta']:g}", _iv(r["reward"]),
              _iv(r["kl"]), _iv(r["win_vs_sft"]), _iv(r["win_vs_ppo"])] for r in rows]  # fmt: skip
    return format_table(head, cells, markdown=True)


def envelope_at(points: list[tuple[float, float]], kl: float) -> float:
    """The best reward reachable at KL ≤ `kl` from these (kl, reward) points and their mixtures.

    A mixture of two policies has reward exactly the mixture of their rewards and, KL being convex,
    at most the mixture of their KLs; so the upper concave envelope of the points, flat to the
    right of its best point, is reachable. Returns -inf when no point has KL ≤ `kl`.
    """
    pts = sorted(points)
    best = -math.inf
    for i, (k1, r1) in enumerate(pts):
        if k1 <= kl:
            best = max(best, r1)
        for k2, r2 in pts[i + 1 :]:
            if k1 <= kl <= k2 and k2 > k1:
                best = max(best, r1 + (r2 - r1) * (kl - k1) / (k2 - k1))
    return best


def _verdict(dpo: float, ppo) -> str:
    """'DPO ≥ PPO' or 'DPO < PPO' on point estimates; a shortfall inside PPO's 95% interval is named."""
    if dpo >= ppo.estimate:
        return "DPO ≥ PPO"
    return "DPO < PPO" + (", within PPO's 95% interval" if dpo >= ppo.low else ", outside PPO's 95% interval")


def paper_check(rows: list[dict]) -> tuple[bool, list[str]]:
    """The DPO paper's finding on this task, checked strictly on point estimates:
    (a) at the KL of every PPO point, the DPO (sigmoid) frontier (from the SFT point, KL 0) reaches
        at least PPO's reward;
    (b) DPO's best win rate vs SFT (over β) is at least PPO's best (over its KL coefficients).
    Each line also says whether a shortfall lies inside PPO's 95% interval."""
    sft = next(r for r in rows if r["method"] == "SFT")
    dpo = [r for r in rows if r["method"] == "DPO" and r["loss"] == "sigmoid"]
    ppo = [r for r in rows if r["method"] == "PPO"]
    dpo_pts = [(0.0, sft["reward"].estimate)] + [(r["kl"].estimate, r["reward"].estimate) for r in dpo]
    lines, ok = [], True
    for p in ppo:
        at = envelope_at(dpo_pts, p["kl"].estimate)
        ok &= at >= p["reward"].estimate
        lines.append(f"PPO (kl_coef {p['beta']:g}) at KL {p['kl'].estimate:.2f}: reward {_iv(p['reward'])}; "
                     f"DPO (sigmoid) frontier there: {at:.3f} → {_verdict(at, p['reward'])}")  # fmt: skip
    best_dpo = max(dpo, key=lambda r: r["win_vs_sft"].estimate)
    best_ppo = max(ppo, key=lambda r: r["win_vs_sft"].estimate)
    ok &= best_dpo["win_vs_sft"].estimate >= best_ppo["win_vs_sft"].estimate
    lines.append(f"win rate vs SFT: DPO (sigmoid, β {best_dpo['beta']:g}) {_iv(best_dpo['win_vs_sft'])}, "
                 f"PPO (kl_coef {best_ppo['beta']:g}) {_iv(best_ppo['win_vs_sft'])} "
                 f"→ {_verdict(best_dpo['win_vs_sft'].estimate, best_ppo['win_vs_sft'])}")  # fmt: skip
    return ok, lines


# ----------------------------------------------------------------------------- the demo


def run_demo(size: str = "full", root: str | Path | None = None, seed: int = 0, log=print) -> dict:
    """Run (or finish) the whole demo in `root`; returns the results rows, paths and MLflow ids."""
    spec = SIZES[size]
    root = Path(root or f"runs/demo-{size}").resolve()
    check_settings(root, {"size": size, "seed": seed, "demo": spec, "task": TASK_SIZES[spec["task"]]})
    db = root / "mlflow.db"
    tracking = {"tracking_uri": f"sqlite:///{db}", "experiment": "raydpo-demo"}
    clock = Clock(log)
    clock(f"raydpo demo --size {size}: everything goes to {root}")
    start_ray(min_cpus=4)  # room for two sweep trials at once (1.1 CPU slots each)
    clock(f"preparing the sentiment task ({spec['task']}) ...", 1)
    manifest = prepare(root / "task", size=spec["task"], seed=seed, tracking=tracking,
                       log=lambda m: clock(f"  {m}"))  # fmt: skip
    base = _base(manifest, root, tracking, seed)

    rm_train = {"epochs": spec["reward_model_epochs"], "eval_every": spec["reward_model_eval_every"]}
    rm = _train(_with(base, run_name="reward-model", method="reward_model", data={"eval_fraction": 0.2},
                      optim={"max_grad_norm": None}, train=rm_train),
                clock, 2, "reward model (Bradley–Terry; 20% of the pairs held out)")  # fmt: skip

    dpo_rows = run_dpo_sweep(spec, base, root, clock, 3)

    pft = _train(_with(base, run_name="preferred-ft", method="preferred_ft",
                       train={"epochs": spec["preferred_ft_epochs"]}), clock, 4, "Preferred-FT")  # fmt: skip
    ppo_common = {"rollout_batch_size": spec["ppo"]["rollout_batch_size"], "minibatch_size": 16}
    prompts_data = {"source": manifest["prompts"]}
    ppo_runs = {}
    for i, coef in enumerate(spec["ppo"]["kl_coefs"]):
        name = "ppo" if i == 0 else f"ppo-kl{coef:g}"
        cfg = _with(base, run_name=name, method="ppo", data=prompts_data,
                    train={"max_steps": spec["ppo"]["steps"], "log_every": 2},
                    ppo={**ppo_common, "reward_model": rm, "reward": "vader", "kl_coef": coef})  # fmt: skip
        ppo_runs[name] = (coef, _train(cfg, clock, 4, f"PPO against the reward model, kl_coef {coef:g}"))
    gt_coef = spec["ppo"]["kl_coefs"][0]
    ppo_gt = _train(_with(base, run_name="ppo-gt", method="ppo_gt", data=prompts_data,
                          train={"max_steps": spec["ppo"]["steps"], "log_every": 2},
                          ppo={**ppo_common, "reward": "vader", "kl_coef": gt_coef}),
                    clock, 4, f"PPO-GT against the ground-truth reward, kl_coef {gt_coef:g}")  # fmt: skip

    bon = f"best-of-{spec['best_of_n']}"
    bon_spec = {"best_of_n": spec["best_of_n"], "policy": manifest["sft_model"], "reward_model": rm}
    policies: dict = {"sft": manifest["sft_model"], "preferred-ft": pft, bon: bon_spec}
    meta = {"sft": {"method": "SFT", "loss": None, "beta": None},
            "preferred-ft": {"method": "Preferred-FT", "loss": None, "beta": None},
            bon: {"method": f"Best-of-{spec['best_of_n']}", "loss": None, "beta": None}}  # fmt: skip
    series = {"sft": "SFT", "preferred-ft": "Preferred-FT", bon: "Best-of-N"}
    for name, (coef, path) in ppo_runs.items():
        policies[name], meta[name], series[name] = path, {"method": "PPO", "loss": None, "beta": coef}, "PPO"
    policies["ppo-gt"], series["ppo-gt"] = ppo_gt, "PPO-GT"
    meta["ppo-gt"] = {"method": "PPO-GT", "loss": None, "beta": gt_coef}
    for r in dpo_rows:
        name = f"dpo-{r['loss']}-b{r['beta']:g}"
        policies[name], series[name] = r["model"], f"DPO ({r['loss']})"
        meta[name] = {"method": "DPO", "loss": r["loss"], "beta": r["beta"]}

    path = eval_config(root, manifest, policies, series, spec, tracking)
    clock(f"evaluating {len(policies)} policies on the held-out prompts ({path}) ...", 5)
    ev = run_eval(str(path), log=lambda m: clock(f"  {m}") if "\n" not in m else None)

    rows = results_rows(ev["results"], meta)
    ranking = rank_dpo_trials(rows, dpo_rows, TrackingConfig(**tracking))
    clock(
        "DPO trials ranked by win rate against SFT: "
        + "; ".join(ranking[:3])
        + (" …" if len(ranking) > 3 else "")
    )
    table = format_results(rows)
    ok, check = paper_check(rows)
    results_md, frontier = root / "results.md", root / "frontier.png"
    shutil.copyfile(Path(ev["out_dir"]) / "frontier.png", frontier)
    text = (f"# raydpo demo --size {size}\n\nTemperature 1; reward = VADER compound score; KL = KL(π‖π_SFT) "
            f"in nats per sample; win rates judged by VADER, ties ½.\n\n{table}\n\n"
            f"Paper's finding {'reproduced' if ok else 'NOT reproduced'}:\n"
            + "".join(f"- {c}\n" for c in check))  # fmt: skip
    results_md.write_text(text)
    tcfg = TrackingConfig(**tracking)
    run_id = find_or_create_run(
        tcfg, root, "demo", {KIND_TAG: "demo"}, {"size": size, "seed": seed, "root": str(root)}
    )
    logger = RunLogger(tracking_uri(tcfg), run_id)
    for f in (results_md, frontier, path):
        logger.log_artifact(f)
    logger.log_table([{k: (_iv(v) if hasattr(v, "estimate") else v) for k, v in r.items()} for r in rows],
                     "results.json")  # fmt: skip
    logger.log_metrics({"paper_finding_reproduced": float(ok), "minutes": clock.elapsed / 60}, step=0)
    logger.finish()
    clock("done", 6)
    log("\n" + table + "\n")
    log(f"Paper's finding {'reproduced' if ok else 'NOT reproduced'}:")
    for c in check:
        log(f"  {c}")
    log(f"\nresults: {results_md}\nfrontier plot: {frontier}")
    log(f"MLflow UI on these runs:\n  mlflow ui --backend-store-uri sqlite:///{db}")
    return {"rows": rows, "table": table, "reproduced": ok, "check": check, "root": str(root),
            "results_md": str(results_md), "frontier": str(frontier), "demo_run_id": run_id,
            "eval_parent_run_id": ev["parent_run_id"], "tracking_uri": tracking["tracking_uri"],
            "minutes": clock.elapsed / 60}  # fmt: skip
