"""`raydpo demo`: the DPO paper's controlled-sentiment comparison (§6.1, Fig. 2) end to end.

On embedded defaults only (a local Ray on 127.0.0.1, a SQLite MLflow store in the demo folder, the
built-in sentiment task; nothing to download):

  1. prepare the task: corpus, tokenizer, SFT policy, VADER-labelled preference pairs
  2. a reward model on those pairs (for PPO and Best-of-N), one per seed
  3. a Ray Tune sweep of DPO over β × seeds (× loss variants at --size tiny), one Ray Train run per trial
  4. the baselines, per seed: Preferred-FT, unlikelihood (per α), PPO against the reward model with
     the adaptive KL controller (one run per target KL), PPO-GT against the ground-truth reward
  5. the evaluation, per seed: `raydpo eval` of every final policy (SFT and Best-of-N included) on
     the held-out prompts at temperature 1, judged by the ground-truth reward (reward, KL to the SFT
     policy, win rates vs SFT and vs PPO), then each method's best policy at every temperature of
     the grid against SFT's samples at temperature 1; and, for every run, its checkpoints along
     training (`eval.every_steps`, evaluate/checkpoints.py), so each run is a curve of points
  6. the results table (mean over seeds), the frontier and win-rate-against-temperature figures,
     the seed-level check of the paper's finding, and the MLflow UI command

Every stage's output is kept in the demo folder; running the demo again reuses finished stages
(an interrupted sweep is resumed), so only the missing work is done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from raydpo.config import TrackingConfig, build_config
from raydpo.engine.session import start_ray
from raydpo.errors import UserError
from raydpo.evaluate.checkpoints import POINTS_FILE, train_and_evaluate
from raydpo.evaluate.frontier import Point, bootstrap_mean, compare_frontiers, verdict
from raydpo.evaluate.metrics import Interval, across_seeds
from raydpo.evaluate.report import fmt_interval as _iv
from raydpo.evaluate.report import plot_frontier_points, plot_winrate_vs_temperature
from raydpo.evaluate.run import run_eval
from raydpo.reporting import format_table
from raydpo.sweep import run_sweep
from raydpo.tasks.prepare import SIZES as TASK_SIZES
from raydpo.tasks.prepare import prepare
from raydpo.tracking import KIND_TAG, RunLogger, find_or_create_run, run_id_for, tracking_uri

# Per size: the task size, the grids, the baselines' budgets, the eval's samples, the checkpoint
# evaluation interval (DPO, the other pair methods, PPO), the temperatures of the win-rate figure and
# its samples.
# PPO's target KLs are the paper's {3, 6, 9, 12} × 16/24 (README, "The demo"): the first is "PPO".
SIZES = {
    "tiny": {
        "task": "tiny",
        "losses": ["sigmoid", "ipo", "hinge"],
        "betas": [0.1],
        "dpo": {"epochs": 2, "lr": 1e-3},
        "preferred_ft_epochs": 1,
        "unlikelihood": {"alphas": [1.0], "epochs": 1},
        "reward_model_epochs": 4,
        "reward_model_eval_every": 9,
        "ppo": {"steps": 6, "kl_targets": [4.0], "rollout_batch_size": 16},
        "best_of_n": 4,
        "eval_samples": 1,
        "every_steps": {"dpo": 12, "pairs": 12, "prompts": 3},
        "temperatures": [0.0, 0.5, 1.0],
        "temperature_samples": 1,
    },
    "full": {
        "task": "full",
        "losses": ["sigmoid"],  # the paper's DPO; IPO and hinge: sweeps/sentiment.yaml
        "betas": [0.05, 0.1, 1.0, 5.0],
        "dpo": {"epochs": 1, "lr": 3e-4},
        "preferred_ft_epochs": 2,
        "unlikelihood": {"alphas": [0.25, 1.0], "epochs": 1},
        "reward_model_epochs": 2,
        "reward_model_eval_every": 50,
        "ppo": {"steps": 30, "kl_targets": [4.0, 2.0, 6.0, 8.0], "rollout_batch_size": 32},
        "best_of_n": 16,
        "eval_samples": 2,
        "every_steps": {"dpo": 48, "pairs": 96, "prompts": 15},
        "temperatures": [0.0, 0.25, 0.5, 0.75, 1.0],
        "temperature_samples": 1,  # per prompt and temperature in the win-rate-against-temperature eval
    },
}  # fmt: skip
STAGES = 6


class Clock:
    """Stage lines with the time since the demo started: `[demo 03:12] 3/6 DPO sweep ...`."""

    def __init__(self, log, stages: int = STAGES):
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


def _train(cfg: dict, clock: Clock, stage: int, what: str) -> dict:
    """One Ray Train run (any method) and the evaluation of its checkpoints; a finished run is not
    trained again (its checkpoints are evaluated only where that is not done yet)."""
    rc = build_config(cfg, f"demo {what}")
    clock(f"{what} ...", stage)
    out = train_and_evaluate(rc, log=lambda m: clock(f"  {m}") if "\n" not in m else None)
    return {
        "model": out["final_model"],
        "run_dir": out["run_dir"],
        "points": out.get("checkpoint_points", []),
    }


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


def _along(spec: dict, root: Path, data: str) -> dict:
    """The `eval` section that evaluates a run's checkpoints with eval-checkpoints.yaml."""
    return {"every_steps": spec["every_steps"][data], "config": str(root / "eval-checkpoints.yaml")}


def run_dpo_sweep(
    spec: dict, base: dict, root: Path, seeds: list[int], clock: Clock, stage: int
) -> list[dict]:
    """The DPO sweep over losses × β × seeds (every trial runs to the end: FIFO; each evaluates its
    checkpoints); one row per trial with its seed, model and checkpoint points."""
    sweep = {
        "name": "dpo-sweep",
        "base": _with(base, run_name="dpo-sweep", method="dpo", optim={"lr": spec["dpo"]["lr"]},
                      train={"epochs": spec["dpo"]["epochs"]}, eval=_along(spec, root, "dpo")),
        "search": {"loss.name": {"grid": spec["losses"]}, "loss.beta": {"grid": spec["betas"]}},
        "seeds": len(seeds),
        "metric": "rewards/accuracies",
        "mode": "max",
        "max_concurrent_trials": 3,  # trials mostly wait on Ray Train start-up: three overlap well on 2 cores
        "trial": {"num_workers": 1, "cpus_per_worker": 1},
    }  # fmt: skip
    path = root / "dpo-sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    sweep_root = Path(base["train"]["output_dir"]) / "dpo-sweep"
    resume = (sweep_root / "tune").exists()
    n = len(spec["losses"]) * len(spec["betas"]) * len(seeds)
    clock(f"DPO sweep: {' / '.join(spec['losses'])} × β {spec['betas']} × {len(seeds)} seed(s) = {n} trials"
          f"{' (resuming)' if resume else ''} ...", stage)  # fmt: skip
    out = run_sweep(str(path), resume=resume, log=lambda m: clock(f"  {m}") if "\n" not in m else None)
    if out["failed"]:
        raise UserError(f"{out['failed']} DPO trial(s) failed; see {out['summary_dir']}")
    rows = []
    for r in out["rows"]:
        run_dir = sweep_root / "trials" / r["trial"]
        points = json.loads((run_dir / POINTS_FILE).read_text())["points"]
        rows.append({"loss": r["loss.name"], "beta": float(r["loss.beta"]), "seed": int(r["train.seed"]),
                     "model": str(run_dir / "final"), "points": points})  # fmt: skip
    return sorted(rows, key=lambda r: (r["seed"], spec["losses"].index(r["loss"]), r["beta"]))


def write_eval(root: Path, name: str, manifest: dict, policies: dict, series: dict, tracking: dict, *,
               baselines: list[str], temperatures: list[float], n: int, seed: int,
               baseline_temperature: float | None = None) -> Path:  # fmt: skip
    cfg = {
        "name": name,
        "prompts": manifest["eval_prompts"],
        "reference": manifest["sft_model"],
        "policies": policies,
        "baselines": baselines,
        "series": series,
        "judge": {"kind": "reward", "name": "vader"},
        "reward": "vader",
        "temperatures": temperatures,
        "baseline_temperature": baseline_temperature,
        "n": n,
        "seed": seed,
        "output_dir": str(root / "runs"),
        "tracking": tracking,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- the results


def over_seeds(values: list) -> Interval | None:
    """One seed: its interval as it is (over prompts); several: the mean across seeds with a 95% t
    interval across them. None when a seed has no value."""
    if any(v is None for v in values):
        return None
    return values[0] if len(values) == 1 else across_seeds([v.estimate for v in values])


def results_rows(per_seed: list[dict], meta: dict) -> list[dict]:
    """One row per evaluated policy (temperature 1, final models): method, loss, setting, and reward,
    KL, win rates over seeds (`over_seeds`)."""
    rows = []
    for name, m in meta.items():
        by_seed = [res[name][1.0] for res in per_seed]
        vals = {k: over_seeds([r.get(key) for r in by_seed]) for k, key in
                (("reward", "reward/gt_mean"), ("kl", "kl"), ("win_vs_sft", "winrate/vs_sft"),
                 ("win_vs_ppo", "winrate/vs_ppo"))}  # fmt: skip
        rows.append({"policy": name, **m, **vals, "seeds": len(per_seed)})
    return rows


def format_results(rows: list[dict]) -> str:
    """A Markdown table (it reads as plain text too)."""
    head = ["method", "loss", "setting", "reward [95% CI]", "KL [95% CI]", "win vs SFT [95% CI]",
            "win vs PPO [95% CI]"]  # fmt: skip
    cells = [[r["method"], r["loss"] or "-", r["setting"] or "-", _iv(r["reward"]), _iv(r["kl"]),
              _iv(r["win_vs_sft"]), _iv(r["win_vs_ppo"])] for r in rows]  # fmt: skip
    return format_table(head, cells, markdown=True)


def rank_dpo_trials(per_seed: list[dict], dpo_rows: list[dict], rows: list[dict], tracking: TrackingConfig,
                    sweep_dir: Path) -> list[str]:  # fmt: skip
    """Rank the sweep's configurations by what the demo measures, win rate against SFT (the sweep's own
    metric, the last batch's reward accuracy, cannot separate them): each trial's MLflow run gets its
    own `winrate/vs_sft` (+ interval), the sweep's parent run `best/winrate/vs_sft` (the best mean over
    seeds) and the best configuration's name as a tag. Returns the ranking lines."""
    uri = tracking_uri(tracking)
    seeds = sorted({d["seed"] for d in dpo_rows})
    for d in dpo_rows:
        iv = per_seed[seeds.index(d["seed"])].get(dpo_name(d), {}).get(1.0, {}).get("winrate/vs_sft")
        run_id = run_id_for(tracking, Path(d["model"]).parent)
        if iv is not None and run_id:
            metrics = {"winrate/vs_sft": iv.estimate, "winrate/vs_sft_ci_low": iv.low,
                       "winrate/vs_sft_ci_high": iv.high}  # fmt: skip
            RunLogger(uri, run_id).log_metrics(metrics, 0)
    ranked = sorted((r for r in rows if r["method"] == "DPO" and r["win_vs_sft"]),
                    key=lambda r: -r["win_vs_sft"].estimate)  # fmt: skip
    parent = run_id_for(tracking, sweep_dir) if ranked else None
    if parent:
        logger = RunLogger(uri, parent)
        logger.log_metrics({"best/winrate/vs_sft": ranked[0]["win_vs_sft"].estimate}, 0)
        logger.set_tags({"raydpo.best_trial": f"{ranked[0]['loss']}-b{ranked[0]['beta']:g}"})
    return [f"{r['loss']} β {r['beta']:g}: win vs SFT {_iv(r['win_vs_sft'])}" for r in ranked]


def dpo_name(d: dict) -> str:
    return f"dpo-{d['loss']}-b{d['beta']:g}"


def _points(points: list[dict]) -> list[Point]:
    return [(p["kl"][0], p["reward/gt_mean"][0]) for p in points]


def paper_check(dpo_by_seed: list[list[Point]], ppo_by_seed: list[list[Point]], sft_by_seed: list[Point],
                win_gaps: list[float]) -> tuple[str, list[str]]:  # fmt: skip
    """The DPO paper's finding on this task, checked on seed-level frontiers: per seed, the mean gap
    between the DPO (sigmoid) frontier and the PPO frontier over their common KL window (each made of
    that seed's checkpoints of every β / every target KL, plus the SFT point at KL 0), then a paired
    bootstrap over seeds of the mean gap (frontier.compare_frontiers). Also, as a second line, the
    per-seed difference of the best win rates vs SFT (DPO's best β minus PPO's best target).
    Returns (the frontier verdict, the report lines)."""
    dpo = [[sft, *pts] for sft, pts in zip(sft_by_seed, dpo_by_seed)]
    ppo = [[sft, *pts] for sft, pts in zip(sft_by_seed, ppo_by_seed)]
    n = len(dpo)
    try:
        check = compare_frontiers(dpo, ppo)
    except ValueError as e:
        return "inconclusive", [f"frontier: not comparable ({e}) → inconclusive"]
    lo, hi = check.window
    seeds = ", ".join(f"{g:+.3f}" for g in check.per_seed)
    boot = f"paired bootstrap over {n} seed{'s' * (n > 1)}"
    lines = [f"frontier: mean reward gap DPO (sigmoid) − PPO over KL [{lo:.2f}, {hi:.2f}], "
             f"per seed [{seeds}]; mean {_iv(check.gap)} ({boot}) → {check.verdict}"]  # fmt: skip
    win, gaps = bootstrap_mean(win_gaps), ", ".join(f"{g:+.3f}" for g in win_gaps)
    lines.append(f"win rate vs SFT, best DPO (sigmoid) − best PPO, per seed [{gaps}]: "
                 f"mean {_iv(win)} ({boot}) → {verdict(win)}")  # fmt: skip
    if n < 2:
        lines.append(
            "one seed gives no interval across seeds: run `raydpo demo --seeds 3` (or more) to decide"
        )
    return check.verdict, lines


# ----------------------------------------------------------------------------- the demo


def run_demo(size: str = "full", root: str | Path | None = None, seed: int = 0, seeds: int = 1,
             log=print) -> dict:  # fmt: skip
    """Run (or finish) the whole demo in `root`; returns the results rows, verdict, paths and MLflow ids."""
    spec = SIZES[size]
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    seed_list = [seed + i for i in range(seeds)]
    root = Path(root or f"runs/demo-{size}").resolve()
    check_settings(
        root, {"size": size, "seed": seed, "seeds": seeds, "demo": spec, "task": TASK_SIZES[spec["task"]]}
    )
    db = root / "mlflow.db"
    tracking = {"tracking_uri": f"sqlite:///{db}", "experiment": "raydpo-demo"}
    clock = Clock(log)
    clock(f"raydpo demo --size {size} --seeds {seeds}: everything goes to {root}")
    start_ray(min_cpus=4)  # room for three sweep trials at once (1.1 CPU slots each)
    clock(f"preparing the sentiment task ({spec['task']}) ...", 1)
    manifest = prepare(root / "task", size=spec["task"], seed=seed, tracking=tracking,
                       log=lambda m: clock(f"  {m}"))  # fmt: skip
    sft = {"sft": manifest["sft_model"]}  # checkpoints: sampling seed 0 + each run's train.seed
    write_eval(root, "eval-checkpoints", manifest, sft, {}, tracking, baselines=["sft"], temperatures=[1.0],
               n=spec["eval_samples"], seed=0)  # fmt: skip
    base = _base(manifest, root, tracking, seed)
    rms = {s: train_reward_model(spec, base, s, clock) for s in seed_list}
    dpo_rows = run_dpo_sweep(spec, base, root, seed_list, clock, 3)
    runs = {s: train_baselines(spec, base, root, manifest, rms[s], s, clock) for s in seed_list}

    meta, series = policy_meta(spec, dpo_rows)
    all_policies = {s: seed_policies(spec, manifest, runs[s], rms[s], [d for d in dpo_rows if d["seed"] == s])
                    for s in seed_list}  # fmt: skip
    per_seed = []
    for s, policies in all_policies.items():
        path = write_eval(root, f"eval-s{s}", manifest, policies, series, tracking, baselines=["sft", "ppo"],
                          temperatures=[1.0], n=spec["eval_samples"], seed=s)  # fmt: skip
        clock(f"evaluating {len(policies)} policies of seed {s} on the held-out prompts ({path}) ...", 5)
        per_seed.append(
            run_eval(str(path), log=lambda m: clock(f"  {m}") if "\n" not in m else None)["results"]
        )
    rows = results_rows(per_seed, meta)
    ranking = rank_dpo_trials(
        per_seed, dpo_rows, rows, TrackingConfig(**tracking), root / "runs" / "dpo-sweep"
    )
    clock("DPO configurations ranked by win rate against SFT: " + "; ".join(ranking[:3])
          + (" …" if len(ranking) > 3 else ""))  # fmt: skip
    curves = temperature_curves(spec, root, manifest, rows, all_policies, tracking, clock)
    return finish(spec, size, seed_list, root, tracking, clock, log, rows, per_seed, runs, dpo_rows, curves)


def seed_policies(spec: dict, manifest: dict, runs: dict, rm: str, dpo_rows: list[dict]) -> dict:
    """One seed's policies for `raydpo eval`: SFT, the baselines, Best-of-N with that seed's reward
    model, and that seed's DPO trials."""
    bon = {"best_of_n": spec["best_of_n"], "policy": manifest["sft_model"], "reward_model": rm}
    return {"sft": manifest["sft_model"], **{k: v["model"] for k, v in runs.items()},
            f"best-of-{spec['best_of_n']}": bon, **{dpo_name(d): d["model"] for d in dpo_rows}}  # fmt: skip


def train_reward_model(spec: dict, base: dict, s: int, clock: Clock) -> str:
    rm_train = {
        "epochs": spec["reward_model_epochs"],
        "eval_every": spec["reward_model_eval_every"],
        "seed": s,
    }
    cfg = _with(base, run_name=f"reward-model-s{s}", method="reward_model", data={"eval_fraction": 0.2},
                optim={"max_grad_norm": None}, train=rm_train)  # fmt: skip
    return _train(cfg, clock, 2, f"reward model, seed {s} (Bradley–Terry; 20% of the pairs held out)")[
        "model"
    ]


def train_baselines(
    spec: dict, base: dict, root: Path, manifest: dict, rm: str, s: int, clock: Clock
) -> dict:
    """Preferred-FT, unlikelihood (per α), PPO (per target KL; the first is "ppo") and PPO-GT of seed s,
    each with its checkpoints evaluated; returns {policy name: {"model", "run_dir", "points"}}."""
    pairs_eval, prompts_eval = _along(spec, root, "pairs"), _along(spec, root, "prompts")
    cfg = _with(base, run_name=f"preferred-ft-s{s}", method="preferred_ft", eval=pairs_eval,
                train={"epochs": spec["preferred_ft_epochs"], "seed": s})  # fmt: skip
    runs = {"preferred-ft": _train(cfg, clock, 4, f"Preferred-FT, seed {s}")}
    for a in spec["unlikelihood"]["alphas"]:
        ul_train = {"epochs": spec["unlikelihood"]["epochs"], "seed": s}
        cfg = _with(base, run_name=f"unlikelihood-a{a:g}-s{s}", method="unlikelihood", eval=pairs_eval,
                    unlikelihood={"alpha": a}, train=ul_train)  # fmt: skip
        runs[f"unlikelihood-a{a:g}"] = _train(cfg, clock, 4, f"unlikelihood, α {a:g}, seed {s}")
    p = spec["ppo"]
    horizon = max(1, p["steps"] * p["rollout_batch_size"] // 10)  # β can move up to e^±2 over a run
    ppo_common = {"rollout_batch_size": p["rollout_batch_size"], "minibatch_size": 16, "kl_horizon": horizon}
    ppo_train = {"max_steps": p["steps"], "log_every": 2, "seed": s}
    prompts_data = {"source": manifest["prompts"]}
    for i, target in enumerate(p["kl_targets"]):
        name = "ppo" if i == 0 else f"ppo-kl{target:g}"
        cfg = _with(base, run_name=f"ppo-kl{target:g}-s{s}", method="ppo", data=prompts_data, train=ppo_train,
                    ppo={**ppo_common, "reward_model": rm, "reward": "vader", "kl_target": target},
                    eval=prompts_eval)  # fmt: skip
        runs[name] = _train(cfg, clock, 4, f"PPO against the reward model, target KL {target:g}, seed {s}")
    target = p["kl_targets"][0]
    cfg = _with(base, run_name=f"ppo-gt-s{s}", method="ppo_gt", data=prompts_data, train=ppo_train,
                ppo={**ppo_common, "reward": "vader", "kl_target": target}, eval=prompts_eval)  # fmt: skip
    runs["ppo-gt"] = _train(
        cfg, clock, 4, f"PPO-GT against the ground-truth reward, target KL {target:g}, seed {s}"
    )
    return runs


def policy_meta(spec: dict, dpo_rows: list[dict]) -> tuple[dict, dict]:
    """(policy name → method, loss, setting, beta) and (policy name → frontier series) of one seed's eval."""
    none = {"loss": None, "setting": None, "beta": None}
    bon = f"best-of-{spec['best_of_n']}"
    meta = {"sft": {"method": "SFT", **none}, "preferred-ft": {"method": "Preferred-FT", **none},
            bon: {"method": f"Best-of-{spec['best_of_n']}", **none}}  # fmt: skip
    series = {"sft": "SFT", "preferred-ft": "Preferred-FT", bon: "Best-of-N"}
    for a in spec["unlikelihood"]["alphas"]:
        meta[f"unlikelihood-a{a:g}"] = {
            "method": "Unlikelihood",
            "loss": None,
            "setting": f"α {a:g}",
            "beta": a,
        }
        series[f"unlikelihood-a{a:g}"] = "Unlikelihood"
    for i, t in enumerate(spec["ppo"]["kl_targets"]):
        name = "ppo" if i == 0 else f"ppo-kl{t:g}"
        meta[name], series[name] = (
            {"method": "PPO", "loss": None, "setting": f"target KL {t:g}", "beta": t},
            "PPO",
        )
    t = spec["ppo"]["kl_targets"][0]
    meta["ppo-gt"], series["ppo-gt"] = (
        {"method": "PPO-GT", "loss": None, "setting": f"target KL {t:g}", "beta": t},
        "PPO-GT",
    )
    for d in dpo_rows:
        meta[dpo_name(d)] = {
            "method": "DPO",
            "loss": d["loss"],
            "setting": f"β {d['beta']:g}",
            "beta": d["beta"],
        }
        series[dpo_name(d)] = f"DPO ({d['loss']})"
    return meta, series


REPRESENTED = ("SFT", "Preferred-FT", "Unlikelihood", "Best-of-N", "PPO", "PPO-GT", "DPO")


def temperature_curves(spec: dict, root: Path, manifest: dict, rows: list[dict], policies: dict[int, dict],
                       tracking: dict, clock: Clock) -> dict:  # fmt: skip
    """Win rate against SFT's samples at temperature 1, at every temperature of the grid, of each
    method's best policy (highest win rate vs SFT at temperature 1, mean over seeds; DPO: sigmoid), one
    eval per seed (`policies[seed]`: that seed's policies); returns {label: [(temperature, Interval)]}."""
    best: dict[str, dict] = {}
    for r in rows:
        label = "Best-of-N" if r["method"].startswith("Best-of-") else r["method"]
        if label == "DPO" and r["loss"] != "sigmoid":
            continue
        win = r["win_vs_sft"].estimate if r["win_vs_sft"] else 0.5
        if label not in best or win > best[label]["win"]:
            best[label] = {"policy": r["policy"], "win": win, "setting": r["setting"]}
    chosen = [best[label]["policy"] for label in REPRESENTED if label in best]
    per_seed = []
    for s, paths in policies.items():
        chosen_paths, name = {n: paths[n] for n in chosen}, f"eval-temperature-s{s}"
        path = write_eval(root, name, manifest, chosen_paths, {}, tracking, baselines=["sft"],
                          temperatures=spec["temperatures"], n=spec["temperature_samples"], seed=s,
                          baseline_temperature=1.0)  # fmt: skip
        clock(
            f"win rate against temperature, seed {s}: {len(chosen)} policies × {spec['temperatures']} ...", 5
        )
        per_seed.append(
            run_eval(str(path), log=lambda m: clock(f"  {m}") if "\n" not in m else None)["results"]
        )
    curves = {}
    for label in (x for x in REPRESENTED if x in best):
        name, setting = best[label]["policy"], best[label]["setting"]
        pts = [
            (t, over_seeds([res[name][t].get("winrate/vs_sft") for res in per_seed]))
            for t in spec["temperatures"]
        ]
        curves[f"{label} ({setting})" if setting else label] = [(t, iv) for t, iv in pts if iv is not None]
    return curves


def finish(spec, size, seeds, root, tracking, clock, log, rows, per_seed, runs, dpo_rows, curves) -> dict:
    """The table, both figures, the paper check, the demo's MLflow run and the console summary."""
    table = format_results(rows)
    by_method: dict[str, list[list[Point]]] = {}
    for i, s in enumerate(seeds):
        sft = (0.0, per_seed[i]["sft"][1.0]["reward/gt_mean"].estimate)
        seed_pts: dict[str, list[Point]] = {"SFT": [sft]}
        for d in (d for d in dpo_rows if d["seed"] == s):
            seed_pts.setdefault(f"DPO ({d['loss']})", [sft]).extend(_points(d["points"]))
        series = {"preferred-ft": "Preferred-FT", "ppo-gt": "PPO-GT"}
        for name, run in runs[s].items():
            label = series.get(name, "PPO" if name.startswith("ppo") else "Unlikelihood")
            seed_pts.setdefault(label, [sft]).extend(_points(run["points"]))
        bon = per_seed[i][f"best-of-{spec['best_of_n']}"][1.0]
        seed_pts["Best-of-N"] = [sft, (bon["kl"].estimate, bon["reward/gt_mean"].estimate)]
        for label, pts in seed_pts.items():
            by_method.setdefault(label, []).append(pts)
    sft_pts = [pts[0] for pts in by_method["SFT"]]
    win_gaps = [_best_win(res, "DPO-sigmoid") - _best_win(res, "PPO") for res in per_seed]
    dpo_pts, ppo_pts = [p[1:] for p in by_method["DPO (sigmoid)"]], [p[1:] for p in by_method["PPO"]]
    verdict_, check = paper_check(dpo_pts, ppo_pts, sft_pts, win_gaps)
    frontier, winplot = root / "frontier.png", root / "winrate_vs_temperature.png"
    n = len(seeds)
    plot_frontier_points(
        by_method, frontier, title=f"reward–KL frontier, every evaluated checkpoint, {n} seed(s)"
    )
    plot_winrate_vs_temperature(curves, "SFT at temperature 1", winplot)
    (root / "points.json").write_text(json.dumps(by_method, indent=1))
    over = (
        "the mean over seeds with a 95% t interval across them"
        if n > 1
        else "one seed, 95% intervals over prompts"
    )
    text = (f"# raydpo demo --size {size} --seeds {n}\n\nFinal policies at temperature 1 ({over}); reward = "
            "VADER compound score; KL = KL(π‖π_SFT) in nats per sample; win rates judged by VADER, ties ½."
            f"\n\n{table}\n\nPaper's finding: {verdict_}\n" + "".join(f"- {c}\n" for c in check))  # fmt: skip
    results_md = root / "results.md"
    results_md.write_text(text)
    tcfg = TrackingConfig(**tracking)
    run_id = find_or_create_run(tcfg, root, "demo", {KIND_TAG: "demo"},
                                {"size": size, "seed": seeds[0], "seeds": n, "root": str(root)})  # fmt: skip
    logger = RunLogger(tracking_uri(tcfg), run_id)
    for f in (results_md, frontier, winplot, root / "points.json", root / "eval-checkpoints.yaml"):
        logger.log_artifact(f)
    logger.log_table([{k: (_iv(v) if isinstance(v, Interval) else v) for k, v in r.items()} for r in rows],
                     "results.json")  # fmt: skip
    reproduced = float(verdict_ == "reproduced")
    logger.log_metrics({"paper_finding_reproduced": reproduced, "minutes": clock.elapsed / 60}, step=0)
    logger.set_tags({"raydpo.paper_check": verdict_})
    logger.finish()
    clock("done", 6)
    log("\n" + table + "\n")
    log(f"Paper's finding: {verdict_}")
    for c in check:
        log(f"  {c}")
    log(f"\nresults: {results_md}\nfrontier plot: {frontier}\nwin rate against temperature: {winplot}")
    log(f"MLflow UI on these runs:\n  mlflow ui --backend-store-uri sqlite:///{root / 'mlflow.db'}")
    return {"rows": rows, "table": table, "verdict": verdict_, "reproduced": verdict_ == "reproduced",
            "check": check, "root": str(root), "results_md": str(results_md), "frontier": str(frontier),
            "winrate_plot": str(winplot), "points": by_method, "curves": curves, "demo_run_id": run_id,
            "tracking_uri": tracking["tracking_uri"], "minutes": clock.elapsed / 60}  # fmt: skip


def _best_win(results: dict, which: str) -> float:
    """The best win rate vs SFT at temperature 1 among one seed's DPO (sigmoid) or PPO policies."""
    names = [n for n in results if (n.startswith("dpo-sigmoid-") if which == "DPO-sigmoid" else
                                    n == "ppo" or n.startswith("ppo-kl"))]  # fmt: skip
    return max(results[n][1.0]["winrate/vs_sft"].estimate for n in names)
