"""Sweeps: a sweep file → Ray Tune over any config key, one Ray Train run per trial.

A sweep file (YAML):

    name: sentiment                  # the sweep's folder under the base config's train.output_dir
    base: ../configs/tiny.yaml       # a config path (relative to this file) or an inline mapping
    search:                          # any config key: grid / choice / uniform / loguniform / randint
      loss.name: {grid: [sigmoid, ipo, hinge]}
      loss.beta: {grid: [0.1, 0.5]}
      optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
    num_samples: 1                   # repeats of the grid (random keys are re-drawn)
    metric: eval/rewards/accuracies  # a step metric name (eval/... needs an eval split)
    mode: max
    scheduler: {type: asha, grace_period: 2, reduction_factor: 2}
    max_concurrent_trials: 2
    trial: {num_workers: 1}          # scaling fields for every trial's Ray Train run
    seeds: 3                         # every point of the space with train.seed = base seed + 0, 1, 2

Everything is validated before any trial starts: every value of every swept key is applied to the
base config and checked. One Tune trial = one TorchTrainer run launched from the trial function
(Ray Train V2); Ray Train's TuneReportCallback forwards its reports, so ASHA can stop a trial.
Trials that do not sweep `model.*` or `data.*` share one tokenized dataset, made once. A base
config with `eval.every_steps` has every trial's checkpoints evaluated after it trains
(evaluate/checkpoints.py), in the trial's process; its eval file is checked before Tune starts.
With `seeds: N` the summary also gives, per point of the space, the metric's mean over the N seeds
with a 95% Student t interval across them (`summary/configs.csv`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path
from typing import Any, Literal

import ray
from pydantic import Field, ValidationError, field_validator, model_validator
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from raydpo.config import (
    RunConfig,
    _describe,
    _Strict,
    apply_overrides,
    build_config,
    config_to_dict,
    read_yaml,
    safe_name,
)
from raydpo.data.pipeline import streams
from raydpo.engine.launch import build_datasets, precomputes_reference, preflight, resolve_paths
from raydpo.engine.reference import attach as attach_reference
from raydpo.engine.session import start_ray
from raydpo.errors import ConfigError, UserError
from raydpo.evaluate.checkpoints import prepare as prepare_checkpoint_eval
from raydpo.evaluate.checkpoints import train_and_evaluate
from raydpo.methods import METHODS, get_method
from raydpo.sweep.report import summarize
from raydpo.tracking import KIND_TAG, RunLogger, find_or_create_run, tracking_uri, ui_hint

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SWEEP_FIELDS = set(
    "name base search num_samples metric mode scheduler max_concurrent_trials trial seed seeds".split()
)


class SearchDim(_Strict):
    grid: list | None = None  # every value, crossed with the other grid keys
    choice: list | None = None  # one value drawn per trial
    uniform: tuple[float, float] | None = None  # a float drawn uniformly from [low, high]
    loguniform: tuple[float, float] | None = None  # a float drawn log-uniformly from [low, high]
    randint: tuple[int, int] | None = None  # an integer drawn from [low, high)

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchDim:
        set_ = [k for k in SPACE_KINDS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of {', '.join(SPACE_KINDS)} (got {set_ or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SPACE_KINDS if getattr(self, k) is not None)

    def probe_values(self) -> list:
        """Values that exercise validation: all listed ones, or the bounds of a range."""
        v = getattr(self, self.kind)
        return list(v) if self.kind != "randint" else [v[0], v[1] - 1]

    def to_tune(self):
        v = getattr(self, self.kind)
        makers = {"grid": tune.grid_search, "choice": tune.choice, "uniform": tune.uniform,
                  "loguniform": tune.loguniform, "randint": tune.randint}  # fmt: skip
        return makers[self.kind](v) if self.kind in ("grid", "choice") else makers[self.kind](*v)


class SchedulerConfig(_Strict):
    type: Literal["asha", "fifo"] = "asha"  # asha stops poor trials early; fifo runs all to the end
    grace_period: int = Field(1, gt=0)  # steps every trial runs before it can be stopped
    reduction_factor: float = Field(2.0, gt=1)  # ASHA keeps 1/reduction_factor at each rung
    max_t: int | None = Field(None, gt=0)  # last rung in steps; None = train.max_steps


class TrialScaling(_Strict):
    num_workers: int | None = Field(None, gt=0)  # Ray Train workers per trial
    cpus_per_worker: float | None = Field(None, gt=0)  # CPUs per worker (None: the base's, else 1)
    use_gpu: bool | None = None  # one GPU per worker
    resources_per_worker: dict[str, float] | None = None  # custom resources per worker


class SweepConfig(_Strict):
    name: str  # the sweep's name: its folder, Tune experiment and MLflow parent run
    base: str | dict = {}  # base run config: a YAML path relative to the sweep file, or inline
    search: dict[str, SearchDim]  # config key → search dimension
    num_samples: int = Field(1, gt=0)  # samples of the space (each repeats the grid)
    metric: str = "loss"  # the metric Tune optimizes: one the base config's method reports (eval/<name> too)
    mode: Literal["min", "max"] = "min"  # minimize or maximize it
    scheduler: SchedulerConfig | None = None  # None = run every trial to the end
    max_concurrent_trials: int = Field(1, gt=0)  # trials at once
    trial: TrialScaling = TrialScaling()  # scaling for each trial's run
    seed: int = 0  # seeds random search
    seeds: int | None = Field(None, gt=0)  # N: each point of the space N times, train.seed = base + 0 … N−1

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        return safe_name(v)

    @model_validator(mode="after")
    def _seeds_or_search(self) -> SweepConfig:
        if self.seeds and "train.seed" in self.search:
            raise ValueError("seeds: train.seed is already in search; give one or the other")
        return self


def load_sweep(path: str | os.PathLike, overrides: list[str] = ()) -> tuple[SweepConfig, dict]:
    """Read and fully validate a sweep file; returns (sweep, base config dict with overrides)."""
    raw = read_yaml(path)
    sweep_over = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in SWEEP_FIELDS]
    base_over = [o for o in overrides if o not in sweep_over]
    raw = apply_overrides(raw, sweep_over)
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, str(path))) from None
    base = (
        read_yaml(Path(path).parent / sweep.base)
        if isinstance(sweep.base, str)
        else copy.deepcopy(sweep.base)
    )
    base = apply_overrides(base, base_over)
    base_cfg = build_config(base, f"{path}: base")
    if sweep.seeds:  # a grid over train.seed, crossed with the rest of the space
        seeds = [base_cfg.train.seed + i for i in range(sweep.seeds)]
        sweep = sweep.model_copy(update={"search": {**sweep.search, "train.seed": SearchDim(grid=seeds)}})
    validate_space(sweep, base, str(path))
    validate_metric(sweep, base_cfg, str(path))
    return sweep, base


def with_params(base: dict, params: dict[str, Any], trial: TrialScaling | None = None) -> dict:
    out = apply_overrides(base, [])
    for key, value in params.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    if trial is not None:
        out.setdefault("scaling", {}).update(trial.model_dump(exclude_none=True))
    return out


def validate_space(sweep: SweepConfig, base: dict, where: str) -> None:
    """Every swept key must exist and every value must pass the config's own validation."""
    for key, dim in sweep.search.items():
        for value in dim.probe_values():
            try:
                RunConfig.model_validate(with_params(base, {key: value}, sweep.trial))
            except ValidationError as e:
                raise ConfigError(_describe(e, f"{where}: search.{key}={value!r}")) from None


def validate_metric(sweep: SweepConfig, base: RunConfig, where: str) -> None:
    """The metric must be one the base config's method reports (its Method record says which)."""
    names = set(METHODS[base.method].reported)
    if sweep.metric not in names:
        raise ConfigError(
            f"{where}: metric {sweep.metric!r} is not reported by method {base.method}; "
            f"allowed: {', '.join(sorted(names))}"
        )
    if sweep.metric.startswith("eval/") and not (
        (base.data.eval_fraction > 0 or base.data.eval_source) and base.train.eval_every
    ):
        raise ConfigError(f"{where}: metric {sweep.metric!r} needs an eval split (data.eval_fraction or "
                          "data.eval_source) and train.eval_every in the base config")  # fmt: skip


def check_resources(sweep: SweepConfig, base: dict) -> None:
    """A trial that asks for more GPUs or custom resources than the cluster has can never start."""
    scaling = RunConfig.model_validate(with_params(base, {}, sweep.trial)).scaling
    cpus = scaling.cpus_per_worker or 1.0
    have = ray.cluster_resources()
    need = {"CPU": scaling.num_workers * cpus, **{
        k: v * scaling.num_workers for k, v in scaling.resources_per_worker.items()}}  # fmt: skip
    if scaling.use_gpu:
        need["GPU"] = float(scaling.num_workers)
    for res, amount in need.items():
        if amount > have.get(res, 0):
            raise UserError(
                f"sweep {sweep.name}: each trial needs {amount:g} {res} ({scaling.num_workers} workers) "
                f"but the Ray cluster has {have.get(res, 0):g}"
            )


def sweep_dir(sweep: SweepConfig, base_cfg: RunConfig) -> Path:
    return (Path(base_cfg.train.output_dir) / sweep.name).resolve()


def shares_data(sweep: SweepConfig) -> bool:
    return not any(k.split(".")[0] in ("model", "data") for k in sweep.search)


# ----------------------------------------------------------------------------- running


def trial_label(params: dict[str, Any]) -> str:
    """A readable MLflow run name for a trial: `sigmoid-b0.1-lr3e-4` from its swept values."""
    short = {"loss.name": "", "loss.beta": "b", "optim.lr": "lr", "train.seed": "seed", "ppo.kl_coef": "kl"}
    parts = []
    for k, v in params.items():
        value = f"{v:g}" if isinstance(v, float) else "+".join(v) if isinstance(v, list) else str(v)
        parts.append(short.get(k, k.rsplit(".", 1)[-1] + "=") + value)
    return "-".join(parts) or "trial"


def trial_main(
    params: dict, *, base: dict, sweep: dict, root: str, cwd: str, parent_run_id, prepared
) -> None:
    """One Tune trial: this trial's config → one Ray Train run, its reports forwarded to Tune."""
    os.chdir(cwd)  # Tune starts trials in their own folders: relative swept paths mean the user's
    trial = TrialScaling.model_validate(sweep["trial"])
    cfg = build_config(with_params(base, params, trial), f"sweep {sweep['name']}")
    trial_id = tune.get_context().get_trial_id()
    store = cfg.train.storage_path  # remote storage: each trial's checkpoints under <storage>/<sweep>/trials
    trials = f"{store.rstrip('/')}/{sweep['name']}/trials" if store else None
    cfg = cfg.model_copy(update={"run_name": trial_id, "train": cfg.train.model_copy(
        update={"output_dir": str(Path(root) / "trials"), "storage_path": trials})})  # fmt: skip
    tags = {
        "raydpo.sweep": sweep["name"],
        "raydpo.trial_id": trial_id,
        **{f"sweep.{k}": str(v) for k, v in params.items()},
    }
    out = train_and_evaluate(
        cfg,
        log=lambda *_: None,
        prepared=prepared,
        kind="trial",
        parent_run_id=parent_run_id,
        tags=tags,
        label=trial_label(params),
        callbacks=[TuneReportCallback()],
        stream=None,
    )
    if out.get("already_finished"):  # a resumed sweep whose state missed this trial's end: report it again
        tune.report({"step": out["total_steps"], **out.get("last_metrics", {})})


def progress_callback(sweep: SweepConfig, total: int, show):
    """A Tune callback that shows one line when a trial starts, finishes or fails."""

    class SweepProgress(tune.Callback):
        # Everything lives on the instance (no closure), and the console function is not pickled
        # with Tune's run config: Tune pickles its callbacks when it saves the experiment.
        def __init__(self, keys: list[str], metric: str, total: int, show):
            self.keys, self.metric, self.total, self.done, self.show = keys, metric, total, 0, show

        def __getstate__(self):
            return {k: v for k, v in self.__dict__.items() if k != "show"}

        def __setstate__(self, state):
            self.__dict__.update(state, show=print)

        def _what(self, trial) -> str:
            return ", ".join(f"{k}={trial.config.get(k)}" for k in self.keys)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.show(f"trial {trial.trial_id} started: {self._what(trial)}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            value = (trial.last_result or {}).get(self.metric)
            got = f" ({self.metric} {value:.4g})" if isinstance(value, (int, float)) else ""
            self.show(f"trial {self.done}/{self.total} finished: {self._what(trial)}{got}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            self.show(f"trial {self.done}/{self.total} FAILED: {self._what(trial)} (see {trial.local_path})")

    return SweepProgress(list(sweep.search), sweep.metric, total, show)


def _tuner(sweep: SweepConfig, trainable, root: Path, max_steps: int, callbacks=None):
    sched = FIFOScheduler()
    if sweep.scheduler and sweep.scheduler.type == "asha":
        s = sweep.scheduler
        sched = ASHAScheduler(time_attr="step", max_t=s.max_t or max_steps, grace_period=s.grace_period,
                              reduction_factor=s.reduction_factor)  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space={k: d.to_tune() for k, d in sweep.search.items()},
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples, scheduler=sched,
            search_alg=BasicVariantGenerator(
                random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials
            ),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(root), verbose=0, callbacks=callbacks),
    )  # fmt: skip


def _parent_run(sweep: SweepConfig, base_cfg: RunConfig, root: Path, path: str) -> str | None:
    if not base_cfg.tracking.enabled:
        return None
    tags = {
        KIND_TAG: "sweep",
        "raydpo.sweep": sweep.name,
        "sweep.metric": sweep.metric,
        "sweep.mode": sweep.mode,
    }
    params = {f"search.{k}": f"{d.kind}:{getattr(d, d.kind)}" for k, d in sweep.search.items()}
    params.update(num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent_trials)
    run_id = find_or_create_run(base_cfg.tracking, root, sweep.name, tags, params)
    RunLogger(tracking_uri(base_cfg.tracking), run_id).log_artifact(path, "sweep")
    return run_id


def run_sweep(path: str, overrides: list[str] = (), resume: bool = False, log=print) -> dict:
    """Validate the sweep file, run (or resume) it on Tune, log and print the summary."""
    sweep, base = load_sweep(path, list(overrides))
    # Every path made absolute here, before Tune moves trials into folders of their own.
    base = config_to_dict(resolve_paths(build_config({**base, "run_name": sweep.name}, f"{path}: base"), log))
    base["scaling"]["cpus_per_worker"] = base["scaling"]["cpus_per_worker"] or 1.0  # trials side by side
    base_cfg = build_config(with_params(base, {}, sweep.trial), f"{path}: base")
    root = sweep_dir(sweep, base_cfg)
    tune_dir = root / "tune"
    if resume and not tune.Tuner.can_restore(str(tune_dir)):
        raise UserError(f"sweep {sweep.name}: nothing to resume at {tune_dir}")
    if not resume and tune_dir.exists():
        raise UserError(
            f"sweep {sweep.name} already exists at {root}; pass --resume to continue it, or rename it"
        )
    preflight(base_cfg)
    prepare_checkpoint_eval(base_cfg)  # a bad eval file fails here, not after the trials trained
    s = base_cfg.scaling
    start_ray(s.num_workers * s.cpus_per_worker + 1)
    check_resources(sweep, base)
    parent = _parent_run(sweep, base_cfg, root, path)
    method = get_method(base_cfg.method)
    shared = shares_data(sweep) and method.data != "prompts"
    prepared = build_datasets(base_cfg, log, texts=method.data == "texts") if shared else None
    if prepared and precomputes_reference(base_cfg, method):  # one reference pass for every trial
        train, evalset, reports = prepared
        splits = {"train": train, **({"eval": evalset} if evalset is not None else {})}
        scored, _ = attach_reference(base_cfg, splits, log, stream=streams(base_cfg))
        prepared = (scored["train"], scored.get("eval"), reports)
    trainable = tune.with_resources(
        tune.with_parameters(trial_main, base=base, sweep=sweep.model_dump(), root=str(root), cwd=os.getcwd(),
                             parent_run_id=parent, prepared=prepared),
        {"CPU": 0.1},  # the trial function mostly waits; its Ray Train workers hold the CPUs
    )  # fmt: skip
    n = _count_trials(sweep)
    log(f"sweep {sweep.name}: {n} trial(s), metric {sweep.metric} ({sweep.mode}), results in {root}")
    console = sys.stdout

    def show(msg: str) -> None:  # progress reaches the console while Tune's own output is redirected
        with contextlib.redirect_stdout(console):
            log(msg)

    if resume:
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_errored=True)
    else:
        callbacks = [progress_callback(sweep, n, show)]
        tuner = _tuner(sweep, trainable, root, base_cfg.train.max_steps or 10**9, callbacks)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "tune_console.log", "a") as f, contextlib.redirect_stdout(f):
        results = tuner.fit()  # Tune's banner and tables go to the file; raydpo prints the summary
    out = summarize(sweep, base_cfg, results, parent, root, log)
    ok = [r for r in out["rows"] if r["status"] == "OK"]
    if ok:
        best = ok[0]
        model = root / "trials" / best["trial"] / "final"
        log(f"best trial {best['trial']} ({trial_label({k: best[k] for k in sweep.search})}): "
            f"{sweep.metric} {best[sweep.metric]:.4g}; model {model}")  # fmt: skip
    if parent:
        log(ui_hint(tracking_uri(base_cfg.tracking), base_cfg.tracking.experiment))
    return out


def _count_trials(sweep: SweepConfig) -> int:
    n = sweep.num_samples
    for d in sweep.search.values():
        n *= len(d.grid) if d.grid is not None else 1
    return n
