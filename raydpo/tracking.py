"""The only module that talks to MLflow.

Runs are found again by their run directory, so a restarted or resumed run keeps logging to the
same MLflow run instead of opening a second one. Secrets never reach MLflow: params come from the
config (which holds no credentials) and tags are set here explicitly.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import ray
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from raydpo import __version__
from raydpo.config import RunConfig, TrackingConfig, config_to_dict, flatten
from raydpo.errors import UserError

RUN_DIR_TAG = "raydpo.run_dir"
KIND_TAG = "raydpo.kind"


def tracking_uri(cfg: TrackingConfig) -> str:
    """Config first, then $MLFLOW_TRACKING_URI, then a SQLite file in the working directory."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with one line when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"MLflow tracking server {uri} is not reachable: {reason}") from None


def _client(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri)


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# Config sections every run logs as params; a method adds its own (Method.params: DPO's loss, PPO's ppo).
COMMON_SECTIONS = ("run_name", "method", "model", "data", "optim", "train", "scaling")


def run_tags(cfg: RunConfig, kind: str, sections: tuple[str, ...] = ()) -> dict[str, str]:
    tags = {
        KIND_TAG: kind,
        "method": cfg.method,
        RUN_DIR_TAG: str(cfg.run_dir.resolve()),
        "raydpo.version": __version__,
        "ray.version": ray.__version__,
        "num_workers": str(cfg.scaling.num_workers),
    }
    if "loss" in sections:  # the DPO family: sortable by loss and β
        tags.update(loss="+".join(cfg.loss.names), beta=str(cfg.loss.beta))
    rev = git_revision()
    if rev:
        tags["git.revision"] = rev
    return tags


def find_or_create_run(
    tracking: TrackingConfig, run_dir: Path, run_name: str, tags: dict[str, str], params: dict[str, Any]
) -> str:
    """The MLflow run tagged with this run directory: the existing one (set RUNNING again), else a new
    run with these tags and params. One directory, one run: restarts never duplicate runs."""
    client = _client(tracking_uri(tracking))
    exp = client.get_experiment_by_name(tracking.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(tracking.experiment)
    key = str(Path(run_dir).resolve())
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{key}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name, tags={**tags, RUN_DIR_TAG: key})
    items = [Param(k, _param(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def start_or_resume_run(
    cfg: RunConfig, method, kind: str = "train", parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str | None:
    """The MLflow run of this training run (None when tracking is off). Params: the common config
    sections and the method's own (`method.params`), not the whole tree (config.yaml has it all)."""
    if not cfg.tracking.enabled:
        return None
    tags = {**run_tags(cfg, kind, method.params), **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    full = config_to_dict(cfg)
    params = flatten({k: full[k] for k in COMMON_SECTIONS + tuple(method.params)})
    return find_or_create_run(cfg.tracking, cfg.run_dir, cfg.run_name, tags, params)


def _param(v: Any) -> str:
    return str(v)[:6000]


class RunLogger:
    """Logs step metrics and artifacts to one MLflow run (used on rank 0 and on the driver)."""

    def __init__(self, uri: str, run_id: str | None):
        self.run_id = run_id
        self.client = _client(uri) if run_id else None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.client:
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.client and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_table(self, rows: list[dict], artifact_file: str) -> None:
        """A table artifact that the MLflow UI shows (and compares) as a table."""
        if self.client and rows:
            self.client.log_table(self.run_id, data={k: [r.get(k) for r in rows] for k in rows[0]},
                                  artifact_file=artifact_file)  # fmt: skip

    def finish(self, status: str = "FINISHED") -> None:
        if self.client:
            self.client.set_terminated(self.run_id, status=status)


def close_stopped_children(uri: str, parent_run_id: str) -> int:
    """Mark child runs still RUNNING after a sweep (trials a scheduler stopped early) as KILLED."""
    client = _client(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    n = 0
    for run in children:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "raydpo.stopped_early", "true")
            client.set_terminated(run.info.run_id, status="KILLED")
            n += 1
    return n
