"""`raydpo eval CONFIG`: sample every policy on the same prompts, judge them against named baselines,
estimate reward and KL to the reference, and log it all to MLflow.

An eval config (YAML):

    name: sentiment-eval
    prompts: runs/sentiment-task/eval_prompts.jsonl    # rows with a prompt column
    reference: runs/sentiment-task/runs/sft/final     # for KL(π‖π_ref), estimated from the samples
    policies:                                          # HF dirs, run dirs, or Best-of-N selections
      sft: runs/sentiment-task/runs/sft/final
      dpo: runs/sentiment-dpo
      best-of-4: {best_of_n: 4, policy: runs/sentiment-task/runs/sft/final,
                  reward_model: runs/sentiment-reward-model}
    series: {dpo: DPO}                                 # frontier series per policy (default: its name)
    baselines: [sft]                                   # every policy is compared with each of these
    judge: {kind: reward, name: vader}                 # see evaluate/judges.py
    reward: vader                                      # ground-truth reward for mean reward (optional)
    temperatures: [0.0, 1.0]
    baseline_temperature: 1.0                          # baselines sampled at 1.0 (default: each temperature)
    seeds: 3                                           # sample with seeds seed, seed + 1, seed + 2

Every policy is sampled in one Ray Data pass (evaluate/generate.py), by one actor per free CPU of
the Ray cluster. With `seeds: N` every policy is
sampled N times (sampling seeds seed ... seed + N − 1) and every number is the mean over the N seeds
with a 95% Student t interval across them; with one seed the intervals are over prompts (Wilson for
win rates, normal for means).

MLflow: one parent run (`raydpo.kind=eval`) holding the results table (also its description), the
reward–KL frontier plot and the win-rate plot, with metrics, per temperature step, `policies` (count)
and `best/winrate/vs_<baseline>` (+ `_ci_low`, `_ci_high`: the best policy's); one child run per
policy, tagged with the policy's path and `eval.method`, with params naming what it is (`method`,
and, when it came from a raydpo run, that run's `loss.name`, `loss.beta`, `optim.lr`, `train.seed`,
`ppo.kl_coef`, `ppo.kl_target` where it has them, and `source_run_id`; Best-of-N: `method=best_of_n`,
`best_of_n`; a bare model directory: `method=unknown`), with metrics `winrate/vs_<baseline>`
(+ `_ci_low`, `_ci_high`), `reward/gt_mean` and `kl` (+ intervals), logged at
step = round(100 × temperature), and a sample table.

A Best-of-N "policy" samples N completions from its policy per prompt and slot and keeps the one the
reward model scores highest (the child run is tagged `eval.best_of_n` and `eval.reward_model`). Its
KL to the reference has no sampled log-ratio; it is reported as the usual analytic value
log N − (N − 1)/N (Stiennon et al. 2020), an upper bound on the true KL (Beirami et al. 2024) that
assumes its policy is the reference, as an interval of width 0 since it is not estimated.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

import ray
from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from raydpo.config import Actors, TrackingConfig, _describe, _Strict, apply_overrides, read_yaml, safe_name
from raydpo.data.prompts import read_prompts as read_prompt_column
from raydpo.engine.session import start_ray
from raydpo.errors import ConfigError, UserError
from raydpo.evaluate.generate import CHUNK, SampleJob, sample_in_process, sample_policies, sampling_work
from raydpo.evaluate.judges import make_judge
from raydpo.evaluate.metrics import Interval, across_seeds, kl_from_samples, mean_interval, win_rate
from raydpo.evaluate.report import fmt_interval, plot_frontier, plot_winrates, results_table
from raydpo.models.rewards import get_reward
from raydpo.models.scoring import score_texts
from raydpo.tracking import KIND_TAG, RUN_DIR_TAG, RunLogger, _client, find_or_create_run, tracking_uri


class BestOfNPolicy(_Strict):
    best_of_n: int = Field(gt=1)  # N: samples drawn per prompt and slot
    policy: str  # the sampled policy (HF dir or run dir), usually the SFT model
    reward_model: str  # reward model (HF dir or run dir, from method=reward_model) that picks the best


PolicySpec = Annotated[
    Annotated[str, Tag("path")] | Annotated[BestOfNPolicy, Tag("best_of_n")],
    Discriminator(lambda v: "best_of_n" if isinstance(v, (dict, BestOfNPolicy)) else "path"),
]


class EvalConfig(_Strict):
    name: str = "eval"  # the eval's folder under output_dir and its MLflow parent run
    prompts: str  # prompt source: jsonl / parquet / HF dataset with a prompt column
    prompt_column: str = "prompt"  # column holding the prompt
    max_prompts: int | None = Field(None, gt=0)  # use the first N prompts
    reference: str  # reference model directory (for KL)
    policies: dict[str, PolicySpec]  # name → HF model dir, raydpo run dir (its final/), or Best-of-N
    baselines: list[str] = []  # policy names that every other policy is compared against
    series: dict[str, str] = {}  # policy name → series label in the frontier plot (default: the name)
    judge: dict = {"kind": "reward", "name": "vader"}  # judge spec (evaluate/judges.py)
    reward: str | None = "vader"  # ground-truth reward name for mean reward; None = skip
    temperatures: list[float] = [1.0]  # sampling temperatures (0 = greedy)
    baseline_temperature: float | None = None  # compare with the baselines' samples at this temperature (one
    #   of temperatures); None = at the same temperature as the policy's
    n: int = Field(1, gt=0)  # samples per prompt and temperature
    max_new_tokens: int = Field(24, gt=0)  # completion length limit
    workers: Actors = "auto"  # sampling actors (Ray Data); 0 = in this process, no Ray;
    #   auto = 0 when the sampling is small (generate.sampling_work up to SMALL_SAMPLING: starting an
    #   actor that loads torch and transformers takes longer), else one per free CPU, at most this
    #   machine's cores on a one-node Ray
    seed: int = 0  # sampling seed (the first one)
    seeds: int = Field(1, gt=0)  # sampling seeds seed ... seed + seeds − 1; results are means across them
    output_dir: str = "runs"  # results go to <output_dir>/<name>
    tracking: TrackingConfig = TrackingConfig()  # MLflow store and experiment

    @field_validator("policies")
    @classmethod
    def _some_policy(cls, v: dict[str, PolicySpec]) -> dict[str, PolicySpec]:
        if not v:
            raise ValueError("needs at least one policy")
        return v

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        return safe_name(v)

    @model_validator(mode="after")
    def _baselines_known(self) -> EvalConfig:
        for b in self.baselines:
            if b not in self.policies:
                raise ValueError(f"baseline {b!r} is not one of the policies ({', '.join(self.policies)})")
        for name in self.series:
            if name not in self.policies:
                raise ValueError(f"series: {name!r} is not one of the policies ({', '.join(self.policies)})")
        if self.baseline_temperature is not None and self.baseline_temperature not in self.temperatures:
            raise ValueError(f"baseline_temperature {self.baseline_temperature:g} is not one of the "
                             f"temperatures {self.temperatures}")  # fmt: skip
        return self


def load_eval_config(path: str | os.PathLike, overrides: list[str] = ()) -> EvalConfig:
    try:
        return EvalConfig.model_validate(apply_overrides(read_yaml(path), list(overrides)))
    except ValidationError as e:
        raise ConfigError(_describe(e, str(path))) from None


def resolve_policy(path: str) -> Path:
    """An HF model directory, or a raydpo run directory whose final/ is one."""
    p = Path(path).expanduser()
    for cand in (p, p / "final"):
        if (cand / "config.json").exists():
            return cand.resolve()
    raise UserError(f"policy {path!r}: neither it nor {path}/final is a model directory (no config.json)")


def read_prompts(cfg: EvalConfig) -> list[str]:
    return read_prompt_column(cfg.prompts, cfg.prompt_column, max_rows=cfg.max_prompts)


def reward_model_scorer(reward_model: Path, tokenizer_dir: Path):
    """score(prompts, completions) → reward-model scores (models.scoring, as in training and PPO)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model, trust_remote_code=False).eval()
    return lambda prompts, completions: score_texts(rm, tok, prompts, completions)


def best_of_n_rows(rows: list[dict], n: int, score) -> list[dict]:
    """Of each `n` consecutive samples (per prompt, temperature and slot k // n), keep the best-scored one."""
    scores = score([r["prompt"] for r in rows], [r["completion"] for r in rows])
    best: dict[tuple, tuple[float, dict]] = {}
    for r, s in zip(rows, scores):
        key = (r["temperature"], r["sample"] // n, r["idx"])
        if key not in best or s > best[key][0]:
            best[key] = (s, {**r, "sample": r["sample"] // n, "rm_score": s})
    return sorted((row for _, row in best.values()), key=lambda r: (r["temperature"], r["sample"], r["idx"]))


def best_of_n_kl(n: int):
    """The analytic KL(best-of-n ‖ π) ≤ log n − (n − 1)/n, as an interval of width 0 (not estimated)."""
    v = math.log(n) - (n - 1) / n
    return Interval(v, v, v, 0)


SMALL_SAMPLING = 1e11  # `workers: auto` samples in this process up to this generate.sampling_work (the
#   tiny demo's two evals, 2.4e10 and 5.9e10, took 6 s and 9 s in process against 32 s and 41 s with
#   four actors on 2 cores)


def sampling_actors(cfg: EvalConfig, jobs: dict[str, SampleJob], n_prompts: int, reference: Path) -> int:
    """`cfg.workers`, with `auto` resolved: 0 (this process) for a small sampling, else one actor per
    free Ray CPU and per chunk, and on a one-node Ray (this machine) at most its cores: Ray may count
    more CPUs than there are, and each actor's start-up is the same imports again."""
    if cfg.workers != "auto":
        return cfg.workers
    if sampling_work(jobs, n_prompts, reference, cfg.temperatures, cfg.max_new_tokens) <= SMALL_SAMPLING:
        return 0
    start_ray()
    chunks = len(jobs) * -(-n_prompts // CHUNK)
    free = int(ray.available_resources().get("CPU", 1))
    if len([n for n in ray.nodes() if n.get("Alive")]) == 1:
        free = min(free, os.cpu_count() or 1)
    return max(1, min(chunks, free))


def sample_all(cfg: EvalConfig, prompts: list[str], reference: Path, log) -> dict[int, dict[str, list[dict]]]:
    """Per sampling seed, the samples of every policy (Best-of-N: its selections), each over the same
    prompts and slots; every policy and seed in one Ray Data pass, or in this process (`cfg.workers`)."""
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    keys, jobs = {}, {}
    for s in seeds:
        for name, spec in cfg.policies.items():
            n = cfg.n * spec.best_of_n if isinstance(spec, BestOfNPolicy) else cfg.n
            keys[(name, s)] = key = f"{len(keys)}:{name}@{s}"
            jobs[key] = SampleJob(str(policy_path(spec)), n, s)
    what = f"{len(cfg.policies)} policies × {len(seeds)} seed(s) × {len(cfg.temperatures)} temperature(s)"
    kw = {"reference": reference, "temperatures": cfg.temperatures, "max_new_tokens": cfg.max_new_tokens}
    actors = sampling_actors(cfg, jobs, len(prompts), reference)
    if actors == 0:
        log(f"  sampling {what} in this process")
        drawn = sample_in_process(jobs, prompts, **kw)
    else:
        start_ray()
        log(f"  sampling {what} in one Ray Data pass ({actors} actor(s))")
        drawn = sample_policies(jobs, prompts, concurrency=actors, **kw)
    out: dict[int, dict[str, list[dict]]] = {s: {} for s in seeds}
    for name, spec in cfg.policies.items():
        score = None
        if isinstance(spec, BestOfNPolicy):
            score = reward_model_scorer(resolve_policy(spec.reward_model), policy_path(spec))
        for s in seeds:
            rows = drawn[keys[(name, s)]]
            out[s][name] = best_of_n_rows(rows, spec.best_of_n, score) if score else rows
    return out


def policy_path(spec: str | BestOfNPolicy) -> Path:
    return resolve_policy(spec.policy if isinstance(spec, BestOfNPolicy) else spec)


def _by_temperature(rows: list[dict], t: float) -> list[dict]:
    return sorted((r for r in rows if r["temperature"] == t), key=lambda r: (r["sample"], r["idx"]))


def summarize_policy(rows: list[dict], t: float, reward, kl=None) -> dict:
    """Mean ground-truth reward and KL to the reference, with 95% intervals, at temperature t
    (`kl` given: used as is, e.g. Best-of-N's analytic value; else estimated from the samples)."""
    rs = _by_temperature(rows, t)
    if kl is None:
        kl = kl_from_samples([r["logp_policy"] for r in rs], [r["logp_ref"] for r in rs])
    out = {"kl": kl}
    if reward is not None:
        out["reward/gt_mean"] = mean_interval(reward([r["completion"] for r in rs]))
    return out


def compare(judge, rows_a: list[dict], rows_b: list[dict], t: float, t_b: float | None = None):
    """Win rate of A at temperature t over B at t_b (None: t) on the same prompts and sample slots,
    with the verdicts."""
    a, b = _by_temperature(rows_a, t), _by_temperature(rows_b, t if t_b is None else t_b)
    verdicts = judge.compare(
        [r["prompt"] for r in a], [r["completion"] for r in a], [r["completion"] for r in b]
    )
    return win_rate(verdicts.outcomes), verdicts, a, b


def _interval_metrics(name: str, iv) -> dict[str, float]:
    return {name: iv.estimate, f"{name}_ci_low": iv.low, f"{name}_ci_high": iv.high}


# Params of the training run that identify a policy, copied onto its eval run (those it has: a PPO run
# has no loss.*, a DPO run no ppo.*), so eval runs can be sorted and compared by method and β.
SOURCE_PARAMS = ("method", "loss.name", "loss.beta", "optim.lr", "train.seed", "ppo.kl_coef", "ppo.kl_target")


def source_params(spec: str | BestOfNPolicy, source_run_id: str | None, source: dict[str, str]) -> dict:
    """What an eval child run says its policy is: the source run's identifying params and its id;
    Best-of-N: `method=best_of_n` and N; a bare model directory (no run): `method=unknown`."""
    if isinstance(spec, BestOfNPolicy):
        out = {"method": "best_of_n", "best_of_n": str(spec.best_of_n)}
    elif source_run_id is None:
        return {"method": "unknown"}
    else:
        out = {"method": "unknown", **{k: source[k] for k in SOURCE_PARAMS if k in source}}
    if source_run_id is not None:
        out["source_run_id"] = source_run_id  # Best-of-N: the run of the policy it samples
    return out


def _source_run(client, experiment: str, path: Path):
    """The raydpo run whose run directory holds this model (path or its parent, for final/): looked
    up in the eval's experiment first, then in every experiment of the store; None when none."""
    source_dir = str(path.parent if path.name == "final" else path)
    query = f"tags.`{RUN_DIR_TAG}` = '{source_dir}'"
    exp = client.get_experiment_by_name(experiment)
    own = [exp.experiment_id] if exp else []
    others = [e.experiment_id for e in client.search_experiments() if e.experiment_id not in own]
    for ids in (own, others):
        found = client.search_runs(ids, filter_string=query, max_results=1) if ids else []
        if found:
            return found[0]
    return None


def _mlflow_child(cfg: EvalConfig, parent: str, name: str, path: Path, results: dict, samples: list[dict]):
    """One eval run per policy, linked to the run that produced it (by the run directory tag; for
    Best-of-N, the run of the policy it samples), with that run's identifying params."""
    uri = tracking_uri(cfg.tracking)
    tags = {
        KIND_TAG: "eval",
        "mlflow.parentRunId": parent,
        "eval.policy": name,
        "eval.policy_path": str(path),
    }
    spec = cfg.policies[name]
    if isinstance(spec, BestOfNPolicy):
        tags.update({"eval.best_of_n": str(spec.best_of_n), "eval.reward_model": spec.reward_model})
    source = _source_run(_client(uri), cfg.tracking.experiment, path)
    if source is not None:
        tags["eval.policy_run_id"] = source.info.run_id
    params = source_params(spec, source and source.info.run_id, source.data.params if source else {})
    tags["eval.method"] = params["method"]
    run_dir = Path(cfg.output_dir).resolve() / cfg.name / name
    params = {"policy": str(path), **params}
    run_id = find_or_create_run(cfg.tracking, run_dir, f"{cfg.name}/{name}", tags, params)
    logger = RunLogger(uri, run_id)
    for t, metrics in results.items():
        logger.log_metrics(metrics, step=round(100 * t))
    logger.log_table(samples, "samples.json")
    logger.finish()
    return run_id


def best_winrates(results: dict, baselines: list[str]) -> dict[float, dict[str, float]]:
    """Per temperature: `policies` (count) and, per baseline, the best policy's win rate against it
    (`best/winrate/vs_<b>` with its interval), the parent eval run's metrics."""
    temps = sorted({t for by_t in results.values() for t in by_t})
    out = {}
    for t in temps:
        m = {"policies": float(sum(t in by_t for by_t in results.values()))}
        for b in baselines:
            key = f"winrate/vs_{b}"
            ivs = [by_t[t][key] for by_t in results.values() if key in by_t.get(t, {})]
            if ivs:
                m.update(_interval_metrics(f"best/{key}", max(ivs, key=lambda iv: iv.estimate)))
        out[t] = m
    return out


def summary_note(cfg: EvalConfig, results: dict, table: str, n_prompts: int) -> str:
    """The parent eval run's description (Markdown): what was compared, who wins, the results table."""
    temps = ", ".join(f"{t:g}" for t in cfg.temperatures)
    lines = [f"**{cfg.name}**: {len(results)} policies × {n_prompts} prompts × {cfg.n} samples, "
             f"judge `{cfg.judge}`, temperatures {temps}.", ""]  # fmt: skip
    t0 = cfg.temperatures[0]
    for b in cfg.baselines:
        key = f"winrate/vs_{b}"
        wins = {n: by_t[t0][key] for n, by_t in results.items() if key in by_t[t0]}
        if wins:
            best = max(wins, key=lambda n: wins[n].estimate)
            lines.append(f"- best vs {b} (temperature {t0:g}): {best}, win rate {fmt_interval(wins[best])}")
    return "\n".join(lines + ["", "```", table, "```"])


def judge_all(cfg: EvalConfig, rows: dict[str, list[dict]], judge, reward) -> tuple[dict, dict]:
    """(results[policy][temperature] = {metric: Interval}, samples[policy] = up to 50 judged pairs) of
    one sampling seed: reward, KL, and the win rate against every baseline (at `baseline_temperature`,
    or at the policy's own)."""
    results: dict[str, dict[float, dict]] = {n: {} for n in rows}
    samples: dict[str, list[dict]] = {n: [] for n in rows}
    for n in rows:
        spec = cfg.policies[n]
        kl = best_of_n_kl(spec.best_of_n) if isinstance(spec, BestOfNPolicy) else None
        for t in cfg.temperatures:
            results[n][t] = summarize_policy(rows[n], t, reward, kl)
            t_b = t if cfg.baseline_temperature is None else cfg.baseline_temperature
            for b in cfg.baselines:
                if b == n and t_b == t:
                    continue
                wr, verdicts, a, bb = compare(judge, rows[n], rows[b], t, t_b)
                results[n][t][f"winrate/vs_{b}"] = wr
                if t == cfg.temperatures[0] and not samples[n]:
                    samples[n] = [{"prompt": x["prompt"], "completion": x["completion"], "baseline": b,
                                   "baseline_completion": y["completion"], "verdict": v}
                                  for x, y, v in zip(a, bb, verdicts.outcomes)][:50]  # fmt: skip
    return results, samples


def mean_over_seeds(per_seed: list[dict]) -> dict:
    """Every metric of every policy and temperature as its mean over seeds, with a 95% Student t
    interval across them (n = the number of seeds)."""
    first = per_seed[0]
    return {n: {t: {k: across_seeds([r[n][t][k].estimate for r in per_seed]) for k in m}
                for t, m in by_t.items()} for n, by_t in first.items()}  # fmt: skip


def run_eval(path: str, overrides: list[str] = (), log=print) -> dict:
    """Validate, check the judge, sample every policy (Ray Data), judge, log, print the table."""
    cfg = load_eval_config(path, overrides)
    policies = {n: policy_path(p) for n, p in cfg.policies.items()}
    for spec in cfg.policies.values():
        if isinstance(spec, BestOfNPolicy):
            resolve_policy(spec.reward_model)
    reference = resolve_policy(cfg.reference)
    judge = make_judge(cfg.judge)
    judge.check()  # an unreachable judge fails here, before any generation
    reward = get_reward(cfg.reward) if cfg.reward else None
    prompts = read_prompts(cfg)
    log(
        f"eval {cfg.name}: {len(policies)} policies × {len(prompts)} prompts × "
        f"{len(cfg.temperatures)} temperatures"
    )
    by_seed = sample_all(cfg, prompts, reference, log)
    per_seed = [judge_all(cfg, rows, judge, reward) for rows in by_seed.values()]
    results = per_seed[0][0] if len(per_seed) == 1 else mean_over_seeds([r for r, _ in per_seed])
    samples = per_seed[0][1]
    out_dir = Path(cfg.output_dir).resolve() / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    table = results_table(results, cfg.baselines)
    (out_dir / "results.txt").write_text(table + "\n")
    plots = [
        plot_frontier(results, out_dir / "frontier.png", cfg.series),
        plot_winrates(results, cfg.baselines, out_dir / "winrates.png"),
    ]
    parent = None
    if cfg.tracking.enabled:
        uri = tracking_uri(cfg.tracking)
        params = {
            "prompts": cfg.prompts,
            "judge": str(cfg.judge),
            "temperatures": str(cfg.temperatures),
            "seed": cfg.seed,
            "seeds": cfg.seeds,
            "baseline_temperature": str(cfg.baseline_temperature),
        }
        parent = find_or_create_run(cfg.tracking, out_dir, cfg.name, {KIND_TAG: "eval"}, params)
        for n, p in policies.items():
            flat = {t: {k: v for name, iv in m.items() for k, v in _interval_metrics(name, iv).items()}
                    for t, m in results[n].items()}  # fmt: skip
            _mlflow_child(cfg, parent, n, p, flat, samples[n] or [{"prompt": "", "completion": ""}])
        logger = RunLogger(uri, parent)
        for t, m in best_winrates(results, cfg.baselines).items():
            logger.log_metrics(m, step=round(100 * t))
        _client(uri).set_tag(parent, "mlflow.note.content", summary_note(cfg, results, table, len(prompts)))
        for f in [out_dir / "results.txt", *filter(None, plots)]:
            logger.log_artifact(f)
        logger.finish()
    log(table)
    return {
        "results": results,
        "table": table,
        "parent_run_id": parent,
        "out_dir": str(out_dir),
        "per_seed": [r for r, _ in per_seed],
    }
