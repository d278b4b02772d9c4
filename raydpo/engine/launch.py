"""A whole training run on Ray, for any method: checks → data → TorchTrainer.fit → exported model.

Everything that can be wrong with the input (config, model path, data source, chat template,
Ray address, MLflow URI) is checked on the driver before Ray starts work, so it fails in seconds
with one line. Without RAY_ADDRESS a local Ray is started on 127.0.0.1 (engine/session.py); with it,
the run joins that cluster. The run directory `<train.output_dir>/<run_name>` is also Ray Train's
storage for this run: starting the same run name again resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import ray.train
import yaml
from ray.data import ExecutionOptions
from ray.train.torch import TorchTrainer

from raydpo.config import RunConfig, config_to_dict, dump_config, flatten
from raydpo.data.pipeline import hash_split, prepare_dataset, store_parquet, streams, tokenize_workers
from raydpo.data.pipeline import preflight as data_preflight
from raydpo.data.prompts import read_prompts
from raydpo.data.tokenize import pad_token_id
from raydpo.engine.backend import ProcessGroupConfig
from raydpo.engine.checkpointing import publish_dir, tidy_run_dir
from raydpo.engine.method import Method
from raydpo.engine.progress import Progress
from raydpo.engine.reference import COLUMNS as REF_COLUMNS
from raydpo.engine.reference import attach as attach_reference
from raydpo.engine.session import local_ray, start_ray
from raydpo.engine.storage import check_storage, is_uri, join, upload_dir
from raydpo.engine.worker import train_loop_per_worker
from raydpo.errors import UserError
from raydpo.models.loading import load_tokenizer, resolve_model_path
from raydpo.redact import redact_mapping
from raydpo.tracking import (
    RunLogger,
    absolute_uri,
    check_reachable,
    drain_spool,
    open_store,
    start_or_resume_run,
    tracking_uri,
    ui_hint,
)

REPORT_POLL_S = "0.2"  # seconds between Ray Train controller polls (see ray_train_configs)


def in_ray_job() -> bool:
    """True inside `ray job submit --working-dir`: the working directory is Ray's temporary copy."""
    return "runtime_resources" in Path.cwd().parts


def output_root() -> Path:
    """Where relative outputs go: the working directory, or under a Ray job $RAYDPO_HOME (default
    ~/raydpo), since Ray deletes its copy of the working directory after the job."""
    return Path(os.environ.get("RAYDPO_HOME", Path.home() / "raydpo")) if in_ray_job() else Path.cwd()


def resolve_paths(cfg: RunConfig, log=print) -> RunConfig:
    """Every location made absolute once, here on the driver, before Ray or Tune run anything (Tune
    runs trials in other working directories): outputs (train.output_dir, data.quarantine_path, a
    local tracking store) against `output_root()`, local inputs (model, data, reward model) against
    the working directory."""
    root = output_root()

    def out(p: str | None) -> str | None:
        return None if p is None else str((root / Path(p).expanduser()).resolve())

    def inp(p: str | None) -> str | None:
        local = p is not None and not p.startswith("builtin:") and Path(p).expanduser().exists()
        return str(Path(p).expanduser().resolve()) if local else p

    default_store = f"sqlite:///{root / 'mlflow.db'}"
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store
    local = uri.removeprefix("sqlite:///").removeprefix("file://").removeprefix("file:")
    outputs = (cfg.train.output_dir, cfg.data.quarantine_path)
    relative = [p for p in outputs if p and not Path(p).is_absolute()]
    if (local != uri or "://" not in uri) and not Path(local).is_absolute():  # a local store, relative
        uri = uri[: len(uri) - len(local)] + str((root / local).resolve())
        relative.append(local)
    if in_ray_job() and (relative or not cfg.tracking.tracking_uri):
        log(f"running under `ray job submit --working-dir`: relative outputs go to {root}, not into Ray's "
            "temporary copy of the working directory (set RAYDPO_HOME, train.output_dir or "
            "tracking.tracking_uri to choose)")  # fmt: skip
    m, d, t = cfg.model, cfg.data, cfg.train
    return cfg.model_copy(update={
        "model": m.model_copy(update={"policy": inp(m.policy), "reference": inp(m.reference),
                                      "tokenizer": inp(m.tokenizer)}),
        "data": d.model_copy(update={"source": inp(d.source), "eval_source": inp(d.eval_source),
                                     "quarantine_path": out(d.quarantine_path)}),
        "train": t.model_copy(update={"output_dir": out(t.output_dir),
                                      "storage_path": t.storage_path if is_uri(t.storage_path)
                                      else out(t.storage_path)}),
        "tracking": cfg.tracking.model_copy(update={"tracking_uri": absolute_uri(uri)}),
        "ppo": cfg.ppo.model_copy(update={"reward_model": inp(cfg.ppo.reward_model)}),
    })  # fmt: skip


def resolve_scaling(cfg: RunConfig) -> RunConfig:
    """`scaling.cpus_per_worker` unset: on a local Ray each worker gets an equal share of this
    machine's CPUs (all of them for one worker: torch then uses every core), on a cluster 1."""
    if cfg.scaling.cpus_per_worker is not None:
        return cfg
    local = local_ray()
    cpus = max(1, (os.cpu_count() or 1) // cfg.scaling.num_workers) if local else 1
    return cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"cpus_per_worker": float(cpus)})})


FINISHED = "finished.json"  # written last by a run that completed: its steps, MLflow run, last metrics


def check_run_dir(cfg: RunConfig, resume: bool, log=print) -> None:
    """A run directory holds one config. Another config is refused unless `resume` (then the old
    config.yaml is kept as config.<n>.yaml beside the new one, and a finished run is no longer
    finished); the same config resumes silently."""
    path = cfg.run_dir / "config.yaml"
    if path.is_file():
        old = flatten(yaml.safe_load(path.read_text()) or {})
        new = flatten(redact_mapping(config_to_dict(cfg)))  # config.yaml holds secrets redacted
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if diff and not resume:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
            more = f" (+{len(diff) - 6} more)" if len(diff) > 6 else ""
            raise UserError(
                f"{cfg.run_dir} holds a run trained with another config ({shown}{more}); "
                "pass --resume to continue it with this config, or choose another run_name"
            )
        if diff:
            n = 1 + sum(1 for _ in cfg.run_dir.glob("config.*.yaml"))
            os.replace(path, cfg.run_dir / f"config.{n}.yaml")
            (cfg.run_dir / FINISHED).unlink(missing_ok=True)
            changed = ", ".join(diff)
            log(f"resuming {cfg.run_name} with a changed config ({changed}); the old one is config.{n}.yaml")
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, path)


def preflight(cfg: RunConfig, check_data: bool = True):
    """All input checks that need no Ray; returns the tokenizer."""
    resolve_model_path(cfg.model.policy)
    if cfg.model.reference:
        resolve_model_path(cfg.model.reference, field="model.reference")
    tokenizer = load_tokenizer(cfg.model)
    for source in filter(None, [cfg.data.source, cfg.data.eval_source] if check_data else []):
        data_preflight(cfg, tokenizer, source)
    if cfg.tracking.enabled:
        check_reachable(tracking_uri(cfg.tracking))
    if cfg.train.storage_path:
        check_storage(cfg.train.storage_path)
    return tokenizer


def build_datasets(cfg: RunConfig, log, texts: bool = False):
    """(train Dataset, eval Dataset or None, quarantine reports): validated, tokenized, and either
    materialized or, when the run streams (`data.pipeline.streams`), stored as parquet in
    `<run_dir>/data/` and streamed from there. `texts`: the source holds SFT texts, not pairs."""
    qpath = Path(cfg.data.quarantine_path or cfg.run_dir / "quarantine.jsonl")
    store = cfg.run_dir / "data" if streams(cfg) else None
    where = lambda split: store / split if store else None
    train, report = prepare_dataset(cfg, cfg.data.source, qpath, texts=texts, store=where("train"))
    log(report.summary())
    reports = [report]
    evalset = None
    if cfg.data.eval_source:
        evalset, er = prepare_dataset(cfg, cfg.data.eval_source, qpath.with_name("quarantine.eval.jsonl"),
                                      texts=texts, store=where("eval"))  # fmt: skip
        reports.append(er)
    elif cfg.data.eval_fraction > 0 and store:  # the held-out share stored once: an eval pass reads only it
        train, evalset = hash_split(train, cfg.data.eval_fraction, cfg.train.seed)
        evalset = store_parquet(evalset, store / "eval")
    elif cfg.data.eval_fraction > 0:
        train, evalset = train.train_test_split(
            test_size=cfg.data.eval_fraction, shuffle=True, seed=cfg.train.seed
        )
    if store:
        log(f"streaming: tokenized pairs in {store}, each worker reads its own shard")
        return train, evalset, reports
    return train.materialize(), (evalset.materialize() if evalset is not None else None), reports


def precomputes_reference(cfg: RunConfig, method: Method) -> bool:
    """Whether this run reads reference log-probs from its data (`train.precompute_reference`)."""
    wanted = cfg.train.precompute_reference and method.uses_reference(cfg)
    return bool(wanted and method.objective(cfg).reads_reference)


def steps_per_epoch(cfg: RunConfig, method: Method, n_rows: int) -> int:
    """Steps in one pass over `n_rows` with every worker's batch (prompts: with replacement, at least 1)."""
    per_worker = cfg.ppo.rollout_batch_size if method.data == "prompts" else cfg.train.batch_size
    global_batch = per_worker * cfg.scaling.num_workers
    per_epoch = n_rows // global_batch
    if per_epoch == 0 and method.data != "prompts":
        raise UserError(
            f"{cfg.data.source}: {n_rows} training rows (after quarantine and any eval split) do not fill "
            f"one global batch of {global_batch} "
            f"(train.batch_size={cfg.train.batch_size} × scaling.num_workers={cfg.scaling.num_workers})"
        )
    return max(per_epoch, 1)


def export_final(checkpoint_dir: Path, tokenizer, target: Path) -> Path:
    """Copy the last checkpoint's model (plus tokenizer) to `target`, atomically."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir / "model", tmp)
    tokenizer.save_pretrained(tmp)
    return publish_dir(tmp, target)


def run(
    cfg: RunConfig, method: Method, log=print, *, resume: bool = False, prepared=None, kind=None,
    parent_run_id: str | None = None, tags: dict[str, str] | None = None, label: str | None = None,
    callbacks: list | None = None, stream=sys.stderr,
) -> dict:  # fmt: skip
    """Train `cfg` with `method` on Ray Train and export the final model to <run_dir>/final.

    `resume` continues a run directory that holds another config. A sweep trial passes `prepared`
    (datasets tokenized once for the whole sweep), its kind, the sweep's parent MLflow run, its swept
    values as tags, a readable MLflow run name (`label`), and Tune's report callback.
    Returns {run_dir, final_model, history, mlflow_run_id, total_steps}.

    On a local Ray, a run whose workers each read the whole dataset it prepares itself (not
    streamed, not a sweep's) starts Ray Train as soon as the rest of `prepare_inputs` runs in this
    process: Ray Train's controller and workers start, import torch and the model code while this
    process validates, tokenizes and scores the data; the workers then fetch the inputs from the
    progress channel (`Progress.post`, `engine.worker`). A bad input stops the workers before
    training and is raised here as it would be without the overlap.
    """
    cfg = resolve_scaling(resolve_paths(cfg, log))
    if method.check:
        method.check(cfg)
    prompts_only = method.data == "prompts"
    tokenizer = preflight(cfg, check_data=not prompts_only)
    check_run_dir(cfg, resume, log)
    done = cfg.run_dir / FINISHED
    if done.is_file():  # the same config, already trained to the end: nothing to do (a resumed sweep)
        record = json.loads(done.read_text())
        log(f"{cfg.run_name} already finished ({record['total_steps']} steps): {record['final_model']}")
        return {"run_dir": str(cfg.run_dir), "history": [], "already_finished": True, **record}
    tidy_run_dir(cfg.run_dir, log)
    if cfg.tracking.enabled:
        open_store(tracking_uri(cfg.tracking))  # in the background while Ray starts
    start_ray(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1)
    loop_config: dict = {
        "method": method, "pad_id": pad_token_id(tokenizer), "run_config": cfg.model_dump(mode="json"),
        "tracking_uri": tracking_uri(cfg.tracking),
    }  # fmt: skip
    # Only on a Ray this process started, whose one spare CPU slot (`start_ray`) is all that the
    # driver's own data work needs while Ray Train holds the rest (`prepare_inputs` calls `begin`).
    overlap = not prompts_only and prepared is None and not streams(cfg) and local_ray()
    with Progress(None, method.progress, stream) as progress:
        loop_config["progress"] = progress.channel
        started: list[Background] = []

        def begin() -> bool:
            """Start Ray Train now (its workers fetch the rest of the loop config, `Progress.post`);
            whether it is starting."""
            if overlap and not started:
                early = {**loop_config, "inputs_later": True}
                started.append(Background(fit, cfg, early, {}, callbacks))
            return bool(started)

        try:
            inputs = prepare_inputs(cfg, method, log, prepared, kind, parent_run_id, tags, label, begin)
        except BaseException:
            if started:
                progress.post(None)  # the workers return before training
                started[0].join(quiet=True)
            raise
        progress.total = inputs.steps
        later = inputs.loop_config
        try:
            if started:
                posted = progress.post({**later, **worker_data(inputs.datasets)})
                result = started[0].join()
                del posted  # held while the workers may fetch it (a restarted worker group too)
            else:
                result = fit(cfg, {**loop_config, **later}, inputs.datasets, callbacks)
        except BaseException:
            drain_spool(inputs.uri, inputs.run_id, cfg.run_dir / "mlflow-spool.jsonl")
            tolerant(log, inputs.driver_log.finish, "FAILED")
            raise
    uri, run_id, driver_log, steps = inputs.uri, inputs.run_id, inputs.driver_log, inputs.steps
    with result.checkpoint.as_directory() as ckpt:  # a checkpoint on remote storage is downloaded here
        final = export_final(Path(ckpt), tokenizer, cfg.run_dir / "final")
    stored = upload_dir(final, join(cfg.run_location, "final")) if cfg.train.storage_path else None
    summary = describe(cfg, method, inputs.n_rows, steps, progress.history)
    drain_spool(uri, run_id, cfg.run_dir / "mlflow-spool.jsonl")
    tolerant(log, driver_log.log_model, final, cfg.tracking.log_model, stored)
    tolerant(log, driver_log.set_description, summary)
    tolerant(log, driver_log.finish)
    log(summary)
    log(f"final model: {final}" + (f" and {stored}" if stored else ""))
    if run_id:
        tolerant(log, lambda: log(ui_hint(uri, cfg.tracking.experiment)))
    last = next((h for h in reversed(progress.history) if "loss" in h), {})
    record = {"final_model": str(final), "mlflow_run_id": run_id, "total_steps": steps, "last_metrics": last,
              "final_model_uri": stored}  # fmt: skip
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, done)  # last: a run without it did not complete
    return {"run_dir": str(cfg.run_dir), "history": progress.history, **record}


@dataclass
class Inputs:
    """What `prepare_inputs` made: the datasets, the run's size, its MLflow run, and the loop config
    entries that depend on them."""

    datasets: dict
    n_rows: int
    steps: int
    uri: str
    run_id: str | None
    driver_log: RunLogger
    loop_config: dict


def prepare_inputs(
    cfg, method, log, prepared, kind, parent_run_id, tags, label, begin=lambda: False
) -> Inputs:
    """The data (validated, tokenized, with reference log-probs where the run reads them), the number
    of steps, and the MLflow run with the data's records.

    `begin()` (whether Ray Train is starting) is called once what is left runs in this process, so
    that no Ray Data actor waits for CPUs that a starting Ray Train holds: before the data stage
    when the driver tokenizes (`data.pipeline.tokenize_workers` 0), else after it; with Ray Train
    starting the reference is scored here too (`train.reference_workers: auto`; a number of actors
    that the config sets starts Ray Train after the scoring instead)."""
    loop_config: dict = {}
    if method.data == "prompts":
        d = cfg.data
        prompts = read_prompts(d.source, d.columns.prompt, fmt=d.format, split=d.split, max_rows=d.max_rows,
                               max_bad_fraction=d.max_bad_fraction)  # fmt: skip
        datasets, reports, n_rows = {}, [], len(prompts)
        loop_config.update(prompts=prompts, has_eval=False)
    else:
        precompute = precomputes_reference(cfg, method)
        actors_asked = precompute and cfg.train.reference_workers not in ("auto", 0)
        if prepared is None and not actors_asked and tokenize_workers(cfg, streamed=streams(cfg)) == 0:
            begin()  # validated and tokenized in this process
        train, evalset, reports = prepared or build_datasets(cfg, log, texts=method.data == "texts")
        datasets = {"train": train, **({"eval": evalset} if evalset is not None else {})}
        training = not actors_asked and begin()
        if precompute:
            if REF_COLUMNS[0] not in train.schema().names:  # a sweep attaches them once for its trials
                here = 0 if training else None  # Ray Train holds the CPUs an actor would wait for
                datasets, outcome = attach_reference(cfg, datasets, log, stream=streams(cfg), workers=here)
                tags = {**(tags or {}), "raydpo.reference_logps": outcome}
            loop_config["reference_in_data"] = True
        n_rows = datasets["train"].count()
        loop_config["has_eval"] = evalset is not None
        loop_config["split_data"] = streams(cfg)
    per_epoch = steps_per_epoch(cfg, method, n_rows)
    steps = cfg.train.max_steps or per_epoch * cfg.train.epochs
    uri = tracking_uri(cfg.tracking)
    run_id = start_or_resume_run(cfg, method, kind or method.kind, parent_run_id, tags, label)
    driver_log = RunLogger(uri, run_id)
    driver_log.log_artifact(cfg.run_dir / "config.yaml")
    for r, context in zip(reports, ("training", "eval")):
        driver_log.log_artifact(r.path, "quarantine") if r.path else None
        profile = {"rows": r.total, "kept": r.kept, "quarantined": r.bad, "reasons": r.counts}
        driver_log.log_dataset(r.source, context, profile)
    if method.data == "prompts":
        driver_log.log_dataset(
            cfg.data.source, "training", {"rows": n_rows, "kept": n_rows, "quarantined": 0}
        )
    if reports:
        _write_report(cfg, reports, driver_log)
    where = f", MLflow run {run_id}" if run_id else ""
    what = f"loss {'+'.join(cfg.loss.names)}" if method.kind == "train" else f"method {cfg.method}"
    unit = {"pairs": "pairs", "texts": "texts", "prompts": "prompts"}[method.data]
    log(f"training {cfg.run_name}: {n_rows} {unit}, {steps} steps, "
        f"{cfg.scaling.num_workers} worker(s), {what}{where}")  # fmt: skip
    loop_config.update(total_steps=steps, steps_per_epoch=per_epoch, mlflow_run_id=run_id)
    return Inputs(datasets, n_rows, steps, uri, run_id, driver_log, loop_config)


class Background:
    """`fn(*args)` in a thread of this process; `join` returns its result or raises its exception."""

    def __init__(self, fn, *args):
        self._out: list = []
        name = f"raydpo-{getattr(fn, '__name__', 'call')}"
        self._thread = threading.Thread(target=self._run, args=(fn, *args), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn, *args) -> None:
        try:
            self._out.append((True, fn(*args)))
        except BaseException as e:  # handed to the joining thread
            self._out.append((False, e))

    def join(self, quiet: bool = False):
        """The result; `quiet`: wait, and drop an exception (the caller raises its own)."""
        self._thread.join()
        ok, value = self._out[0]
        if ok or quiet:
            return value if ok else None
        raise value


def tolerant(log, fn, *args) -> None:
    """A tracking call at the end of a run: a store that is down costs the record, not the trained model."""
    try:
        fn(*args)
    except Exception as e:  # MLflow's own errors, network errors: reported, not raised
        log(f"raydpo: MLflow did not take {getattr(fn, '__name__', 'a record')} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); the model and checkpoints are on disk")  # fmt: skip


def describe(cfg: RunConfig, method: Method, n_rows: int, steps: int, history: list[dict]) -> str:
    """One paragraph for the console and the MLflow run's description: what, on what, with what result."""
    what = f"{'+'.join(cfg.loss.names)} (beta {cfg.loss.beta:g})" if "loss" in method.params else cfg.method
    per_worker = cfg.ppo.rollout_batch_size if method.data == "prompts" else cfg.train.batch_size
    text = (f"{what} on {cfg.model.policy}, data {cfg.data.source} ({n_rows} {method.data}), {steps} steps "
            f"of {per_worker} per worker x {cfg.scaling.num_workers} worker(s), lr {cfg.optim.lr:g}, "
            f"seed {cfg.train.seed}.")  # fmt: skip
    last = next((h for h in reversed(history) if "loss" in h), None)
    if last:
        shown = ", ".join(f"{k} {last[k]:.4g}" for _, k in method.progress if k in last)
        text += f" Last logged step {last['step']}: {shown}."
    evals = next((h for h in reversed(history) if any(k.startswith("eval/") for k in h)), None)
    if evals:
        text += (
            " Eval split: "
            + ", ".join(f"{k} {v:.4g}" for k, v in evals.items() if k.startswith("eval/"))
            + "."
        )
    return text


def _write_report(cfg: RunConfig, reports, driver_log) -> None:
    path = cfg.run_dir / "data_report.json"
    path.write_text(
        json.dumps([{**r.to_dict(), "path": str(r.path) if r.path else None} for r in reports], indent=1)
    )
    driver_log.log_artifact(path)


def ray_train_configs(cfg: RunConfig, callbacks=None):
    """Ray Train's ScalingConfig and RunConfig for this run."""
    # A worker's ray.train.report blocks until the Train controller collects it, which it does once
    # per health-check poll (2 s by default): with reports every few steps that wait dominated small
    # runs. Ray propagates this variable from the process that builds the trainer to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)
    keep = None if cfg.eval.every_steps else cfg.train.num_to_keep  # evaluated later: keep every checkpoint
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker},
    )  # fmt: skip
    run_config = ray.train.RunConfig(
        name=cfg.run_name, storage_path=cfg.train.storage_path or str(Path(cfg.train.output_dir).resolve()),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep),
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures), callbacks=callbacks,
    )  # fmt: skip
    return scaling, run_config


class RunTrainer(TorchTrainer):
    """TorchTrainer without the helper actors that a run does not use. Each Ray Train callback below
    starts an actor, a Python process of its own that imports Ray (about 1.5 CPU-seconds each on this
    project's 2-core machine), on the path to the first step, and Ray Train waits on both before it
    runs the training function:
    - `DatasetsCallback`'s DatasetManager hands out the dataset shards; a run whose workers each read
      the whole materialized dataset gets its iterators in the loop config instead (`fit`);
    - `PlacementGroupCleanerCallback`'s detached cleaner removes the run's placement group if the
      controller dies; on a Ray that this process started (no RAY_ADDRESS) the placement group ends
      with that Ray at exit, so there it is left out. On a cluster it stays.
    Ray is pinned to one version (pyproject.toml); tests/test_startup.py checks these names."""

    def __init__(self, *args, leave_out: tuple[type, ...] = (), **kwargs):
        self._leave_out = leave_out
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self):
        return [c for c in super()._create_default_callbacks() if not isinstance(c, self._leave_out)]


def worker_data(datasets: dict) -> dict:
    """The loop config entries of workers that each read the whole of `datasets`: the iterators Ray
    Train's DataConfig would hand each of them (rows in order), and the driver's DataContext, which
    Ray Train would propagate."""
    from ray.data import DataContext

    options = ExecutionOptions(preserve_order=True)
    config = ray.train.DataConfig(datasets_to_split=[], execution_options=options)
    shards = config.configure(datasets, 1, None, None)[0] if datasets else {}
    return {"shards": shards, "data_context": DataContext.get_current()}


def fit(cfg: RunConfig, loop_config: dict, datasets: dict, callbacks=None):
    """TorchTrainer.fit(), with a training failure reduced to its root cause's last line.

    Not split (every worker streams all pairs in the same order and keeps its slice, worker.py): each
    worker gets the iterators that Ray Train's DataConfig would hand it, and the driver's DataContext,
    in the loop config, and Ray Train gets no datasets. Split (`data.streaming`): Ray Train's own
    `streaming_split`, one equal shard per worker."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    scaling, run_config = ray_train_configs(cfg, callbacks)
    split = bool(loop_config.get("split_data"))
    data_config = ray.train.DataConfig(
        datasets_to_split="all" if split else [], execution_options=ExecutionOptions(preserve_order=True)
    )
    leave_out: tuple[type, ...] = (PlacementGroupCleanerCallback,) if local_ray() else ()
    if not split:
        loop_config = {**worker_data(datasets), **loop_config}  # `inputs_later`: the workers fetch them
        datasets, leave_out = {}, (*leave_out, DatasetsCallback)
    # The loop config reaches the workers through the object store: Ray Train's controller unpickles
    # `train_loop_config` itself, and unpickling the Method would import torch, transformers and the
    # engine there (seconds before it even starts the workers). `ref` lives as long as this call.
    ref = ray.put(loop_config)
    trainer = RunTrainer(
        train_loop_per_worker, train_loop_config={"ref": ref}, scaling_config=scaling, run_config=run_config,
        datasets=datasets, torch_config=ProcessGroupConfig(), dataset_config=data_config, leave_out=leave_out,
    )  # fmt: skip
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"training failed: {_root_cause(e)}") from e


def _root_cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
