"""A whole training run on Ray: checks → Ray Data pipeline → TorchTrainer.fit → exported model.

Everything that can be wrong with the input (config, model path, data source, chat template,
Ray address, MLflow URI) is checked on the driver before Ray starts work, so it fails in seconds
with one line. Without RAY_ADDRESS a local Ray is started on 127.0.0.1; with it, the run joins
that cluster. The run directory `<train.output_dir>/<run_name>` is also Ray Train's storage for
this run: starting the same run name again resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

from raydpo.config import RunConfig, dump_config
from raydpo.errors import UserError

REPORT_POLL_S = "0.2"  # seconds between Ray Train controller polls (see ray_train_configs)


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast when RAY_ADDRESS names a host:port that does not accept connections."""
    if not address or address in ("auto", "local"):
        return
    import socket
    from urllib.parse import urlparse

    url = urlparse(address if "://" in address else f"ray://{address}")
    host, port = url.hostname, url.port or (10001 if url.scheme == "ray" else 6379)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(
            f"RAY_ADDRESS={address}: cannot connect to {host}:{port} ({e.strerror or e})"
        ) from None


def init_ray(cfg: RunConfig, min_cpus: int = 0) -> None:
    """Join RAY_ADDRESS, or start a quiet local Ray bound to 127.0.0.1 with enough CPU slots
    (at least `min_cpus` logical CPUs: the demo asks for room for two sweep trials at once)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    check_ray_address(address)
    kwargs = {"logging_level": "WARNING", "log_to_driver": False, "include_dashboard": False}
    if not address:
        need = max(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 1, min_cpus)
        kwargs.update(
            address="local", num_cpus=int(max(os.cpu_count() or 1, need)), _node_ip_address="127.0.0.1"
        )
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError) as e:
        raise UserError(
            f"cannot start or join Ray ({address or 'local'}): {str(e).splitlines()[0]}"
        ) from None
    quiet_ray()


def quiet_ray() -> None:
    """Ray Data's per-dataset INFO lines and MLflow's store messages are noise on the console."""
    import logging

    import ray

    noisy = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic")
    noisy += ("ray.data._internal.execution.streaming_executor", "mlflow.store.db.utils")
    for name in noisy:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def preflight(cfg: RunConfig, check_data: bool = True):
    """All input checks that need no Ray; returns the tokenizer."""
    from raydpo.data.pipeline import preflight as data_preflight
    from raydpo.modeling import load_tokenizer, resolve_model_path
    from raydpo.tracking import check_reachable, tracking_uri

    resolve_model_path(cfg.model.policy)
    if cfg.model.reference:
        resolve_model_path(cfg.model.reference)
    tokenizer = load_tokenizer(cfg.model)
    for source in filter(None, [cfg.data.source, cfg.data.eval_source] if check_data else []):
        data_preflight(cfg, tokenizer, source)
    if cfg.tracking.enabled:
        check_reachable(tracking_uri(cfg.tracking))
    return tokenizer


def build_datasets(cfg: RunConfig, log):
    from raydpo.data.pipeline import prepare_dataset

    run_dir = cfg.run_dir
    qpath = Path(cfg.data.quarantine_path or run_dir / "quarantine.jsonl")
    train, report = prepare_dataset(cfg, cfg.data.source, qpath, cfg.data.tokenize_workers)
    log(report.summary())
    reports = [report]
    evalset = None
    if cfg.data.eval_source:
        evalset, er = prepare_dataset(cfg, cfg.data.eval_source, qpath.with_name("quarantine.eval.jsonl"))
        reports.append(er)
    elif cfg.data.eval_fraction > 0:
        train, evalset = train.train_test_split(
            test_size=cfg.data.eval_fraction, shuffle=True, seed=cfg.train.seed
        )
    return train.materialize(), (evalset.materialize() if evalset is not None else None), reports


def total_steps(cfg: RunConfig, n_pairs: int) -> int:
    global_batch = cfg.train.batch_size * cfg.scaling.num_workers
    per_epoch = n_pairs // global_batch
    if per_epoch == 0:
        raise UserError(
            f"{n_pairs} training pairs do not fill one global batch of {global_batch} "
            f"(train.batch_size={cfg.train.batch_size} × scaling.num_workers={cfg.scaling.num_workers})"
        )
    return cfg.train.max_steps or per_epoch * cfg.train.epochs


class Progress:
    """Driver-side live lines fed by rank 0 through a Ray queue; also keeps the step history."""

    def __init__(self, total: int, stream=sys.stderr):
        from ray.util.queue import Queue

        # num_cpus=0: the queue actor also fits inside a Tune trial's placement group
        self.queue, self.total, self.stream = (
            Queue(maxsize=10_000, actor_options={"num_cpus": 0}),
            total,
            stream,
        )
        self.history: list[dict] = []
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._drain(timeout=0.5)

    def _drain(self, timeout: float = 0.0) -> None:
        from ray.util.queue import Empty

        try:
            while True:
                item = self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
                self.history.append(item)
                self.show(item)
        except Empty:
            return

    def show(self, m: dict) -> None:
        if self.stream is None:
            return
        step = m["step"]
        if not self.history[:-1]:  # first line: time from here on, not Ray's start-up
            self._start, self._first = time.monotonic(), step
        done = step - self._first
        rate = (time.monotonic() - self._start) / done if done else 0.0
        shown = [("loss", "loss"), ("acc", "rewards/accuracies"), ("margin", "rewards/margins"),
                 ("acc", "accuracy"), ("ppl", "perplexity"), ("reward", "reward/mean"),
                 ("gt reward", "reward/gt_mean"), ("kl", "kl")]  # fmt: skip
        extra = "".join(f"  {label} {m[k]:.3f}" for label, k in shown if k in m)
        speed = f"  {m['pairs_per_second']:.1f} pairs/s" if "pairs_per_second" in m else ""
        eta = rate * (self.total - step)
        print(f"step {step}/{self.total}{extra}{speed}  ETA {eta:.0f}s",
              file=self.stream, flush=True)  # fmt: skip


def export_final(checkpoint_dir: Path, tokenizer, target: Path) -> Path:
    """Copy the last checkpoint's model (plus tokenizer) to `target`, atomically."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint_dir / "model", tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def run(
    cfg: RunConfig, log=print, *, prepared=None, kind: str | None = None, parent_run_id: str | None = None,
    tags: dict[str, str] | None = None, callbacks: list | None = None, stream=sys.stderr,
) -> dict:  # fmt: skip
    """Train with Ray Train and export the final policy to <run_dir>/final. Returns a summary.

    A sweep trial passes `prepared` (datasets tokenized once for the whole sweep), its kind, the
    sweep's parent MLflow run, its swept values as tags, and Tune's report callback.
    """
    from raydpo.tracking import RunLogger, start_or_resume_run, tracking_uri

    if cfg.method in ("ppo", "ppo_gt"):
        from raydpo.baselines.ppo import run_ppo

        return run_ppo(cfg, log, parent_run_id=parent_run_id, tags=tags, stream=stream)
    kind = kind or ("train" if cfg.method == "dpo" else "baseline")
    tokenizer = preflight(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, cfg.run_dir / "config.yaml")
    init_ray(cfg)
    train, evalset, reports = prepared or build_datasets(cfg, log)
    steps = total_steps(cfg, train.count())
    uri = tracking_uri(cfg.tracking)
    run_id = start_or_resume_run(cfg, kind=kind, parent_run_id=parent_run_id, tags=tags)
    driver_log = RunLogger(uri, run_id)
    driver_log.log_artifact(cfg.run_dir / "config.yaml")
    for r in reports:
        driver_log.log_artifact(r.path, "quarantine") if r.path else None
    _write_report(cfg, reports, driver_log)
    where = f", MLflow run {run_id}" if run_id else ""
    what = f"loss {'+'.join(cfg.loss.names)}" if cfg.method == "dpo" else f"method {cfg.method}"
    unit = "texts" if cfg.method == "sft" else "pairs"
    log(f"training {cfg.run_name}: {train.count()} {unit}, {steps} steps, "
        f"{cfg.scaling.num_workers} worker(s), {what}{where}")  # fmt: skip
    try:
        with Progress(steps, stream) as progress:
            result = fit(cfg, train, evalset, steps, tokenizer, uri, run_id, progress, callbacks)
    except BaseException:
        driver_log.finish("FAILED")
        raise
    final = export_final(Path(result.checkpoint.path), tokenizer, cfg.run_dir / "final")
    driver_log.log_artifact(cfg.run_dir / "final" / "config.json", "final_model")
    driver_log.finish()
    log(f"final model: {final}")
    return {"run_dir": str(cfg.run_dir), "final_model": str(final), "history": progress.history,
            "mlflow_run_id": run_id, "total_steps": steps}  # fmt: skip


def _write_report(cfg: RunConfig, reports, driver_log) -> None:
    import json

    path = cfg.run_dir / "data_report.json"
    path.write_text(
        json.dumps([{**r.to_dict(), "path": str(r.path) if r.path else None} for r in reports], indent=1)
    )
    driver_log.log_artifact(path)


def ray_train_configs(cfg: RunConfig, callbacks=None):
    """Ray Train's ScalingConfig and RunConfig for this run (shared by every method's trainer)."""
    import ray.train

    # A worker's ray.train.report blocks until the Train controller collects it, which it does once
    # per health-check poll (2 s by default): with reports every few steps that wait dominated small
    # runs. Ray propagates this variable from the process that builds the trainer to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_S)

    scaling = ray.train.ScalingConfig(
        num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker},
    )  # fmt: skip
    run_config = ray.train.RunConfig(
        name=cfg.run_name, storage_path=str(Path(cfg.train.output_dir).resolve()),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
        failure_config=ray.train.FailureConfig(max_failures=cfg.scaling.max_failures), callbacks=callbacks,
    )  # fmt: skip
    return scaling, run_config


def fit_trainer(trainer):
    """trainer.fit(), with a training failure reduced to its root cause's last line."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"training failed: {_root_cause(e)}") from e


def fit(cfg: RunConfig, train, evalset, steps: int, tokenizer, uri: str, run_id, progress, callbacks=None):
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from raydpo.data.tokenize import pad_token_id
    from raydpo.train.worker import train_loop_per_worker

    loop_config = {
        "run_config": cfg.model_dump(mode="json"), "total_steps": steps, "pad_id": pad_token_id(tokenizer),
        "tracking_uri": uri, "mlflow_run_id": run_id, "progress": progress.queue,
        "has_eval": evalset is not None, "fault_at_step": os.environ.get("RAYDPO_FAULT_AT_STEP"),
        "fault_marker": os.environ.get("RAYDPO_FAULT_MARKER"),
    }  # fmt: skip
    datasets = {"train": train, **({"eval": evalset} if evalset is not None else {})}
    scaling, run_config = ray_train_configs(cfg, callbacks)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        # Not split: every worker streams all pairs in the same order and keeps its slice (worker.py).
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )  # fmt: skip
    return fit_trainer(trainer)


def _root_cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
