"""The only module that talks to MLflow.

Runs are found again by their run directory, so a restarted or resumed run keeps logging to the
same MLflow run instead of opening a second one. A local store's path is made absolute once, on the
driver, and its experiments keep their artifacts next to it. Secrets never reach MLflow: params come from the
config (which holds no credentials) and tags are set here explicitly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

import psutil
import ray
import torch

# MLflow is imported in the functions that use it, not here: a Ray Train worker that logs nothing
# (ranks above 0, or tracking off) then never loads it (about 90 MB of its resident memory).
if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

from raydpo import __version__
from raydpo.config import RunConfig, TrackingConfig, config_to_dict, flatten
from raydpo.errors import UserError
from raydpo.redact import redact, redact_mapping

RUN_DIR_TAG = "raydpo.run_dir"
KIND_TAG = "raydpo.kind"


def tracking_uri(cfg: TrackingConfig) -> str:
    """Config first, then $MLFLOW_TRACKING_URI, then a SQLite file in the working directory; a local
    store's path is made absolute here, on the driver, before Ray or Tune change directory."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    return absolute_uri(uri)


def absolute_uri(uri: str) -> str:
    """`sqlite:///rel.db` → `sqlite:////abs/rel.db`, a bare or file: path → absolute; others unchanged."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    if uri.startswith("file:") or "://" not in uri:
        return Path(uri.removeprefix("file://").removeprefix("file:")).resolve().as_uri()
    return uri


def store_dir(uri: str) -> Path | None:
    """The folder of a local store (SQLite file or file store), None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent
    if uri.startswith("file:"):
        return Path(uri.removeprefix("file://").removeprefix("file:"))
    return None


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """`http://user:pass@host:5000/p` → (`http://host:5000/p`, user, pass); other URIs unchanged."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri, None, None
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, unquote(parts.username or ""), unquote(parts.password or "")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with one line when an HTTP tracking server does not answer (credentials in the URI
    are sent as HTTP basic auth, and never printed)."""
    if not uri.startswith(("http://", "https://")):
        return
    bare, user, password = split_credentials(uri)
    req = urllib.request.Request(bare.rstrip("/") + "/health")
    if user or password:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        urllib.request.urlopen(req, timeout=timeout).read()
    except urllib.error.HTTPError as e:
        why = "refused the credentials" if e.code in (401, 403) else "is not reachable:"
        raise UserError(f"MLflow tracking server {redact(uri)} {why} (HTTP {e.code})") from None
    except (urllib.error.URLError, OSError) as e:
        reason = redact(str(getattr(e, "reason", e)))
        raise UserError(f"MLflow tracking server {redact(uri)} is not reachable: {reason}") from None


_READY: set[str] = set()  # tracking URIs whose store this process has opened and asked once (`_ready`)
_READY_LOCK = threading.Lock()


def _ready(uri: str) -> None:
    """Import MLflow, open the store at `uri` and send it one request, once per process and URI, under a
    lock: MLflow imports modules on first use (a store, the first request's headers), and two threads
    doing that at once can see a module the other is still importing (an ImportError, "partially
    initialized module"). So the first `_client(uri)` of a process does it, alone; later ones find it
    done. An error is raised to that caller (the next one tries again)."""
    if uri in _READY:
        return
    with _READY_LOCK:
        if uri not in _READY:
            _new_client(uri).search_experiments(max_results=1)
            _READY.add(uri)


def open_store(uri: str) -> None:
    """`_ready(uri)` in a background thread, so that MLflow is imported and the store open when the run's
    records are written: a run's driver calls this before it starts Ray, which leaves the CPU mostly
    idle while its processes come up, and importing MLflow and opening a store (a new SQLite store also
    creates its tables) takes about 2 s of CPU on this project's 2-core machine. `_client` waits for
    it (the lock); an error here is left for the first client to raise, from the thread that uses it."""

    def open_quietly() -> None:
        try:
            _ready(uri)
        except Exception:  # raised again, where it is reported, by the first `_client(uri)`
            pass

    threading.Thread(target=open_quietly, daemon=True, name="raydpo-open-store").start()


def _client(uri: str) -> MlflowClient:
    """A client of `uri`, once this process has opened its store (`_ready`)."""
    _ready(uri)
    return _new_client(uri)


def _new_client(uri: str) -> MlflowClient:
    """A client of `uri`; credentials in an HTTP URI go to MLflow's own variables (unless set), so
    MLflow's error messages, which quote the URL, never carry them."""
    from mlflow.tracking import MlflowClient

    bare, user, password = split_credentials(uri)
    if user is not None:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password or "")
    return MlflowClient(tracking_uri=bare)


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, creating it if needed. With a local store its artifacts go next to the
    store (`<store dir>/mlartifacts`), not into whatever the working directory is."""
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    root = store_dir(client.tracking_uri)
    location = (root / "mlartifacts").as_uri() if root else None
    return client.create_experiment(name, artifact_location=location)


def runs_table_url(uri: str, exp_id: str) -> str:
    """Where the experiment's runs table opens (MLflow 3 opens an experiment on another tab)."""
    base = (
        split_credentials(uri)[0].rstrip("/")
        if uri.startswith(("http://", "https://"))
        else "http://127.0.0.1:5000"
    )
    return f"{base}/#/experiments/{exp_id}/runs"


def ui_hint(uri: str, experiment: str) -> str:
    """One line: how to look at the runs in the MLflow UI."""
    exp = _client(uri).get_experiment_by_name(experiment)
    where = runs_table_url(uri, exp.experiment_id) if exp else uri
    if uri.startswith(("http://", "https://")):
        return f"MLflow: runs table at {where}"
    shown = redact(uri)
    return f"MLflow: store {shown}; see it with `mlflow ui --backend-store-uri {shown}` then open {where}"


PACKAGE_DIR = Path(__file__).resolve().parent


def code_revision() -> dict[str, str]:
    """Tags naming the code that ran: the git commit of raydpo's own checkout (with `-dirty` when it
    has uncommitted changes), else nothing; and always a digest of raydpo's source files."""
    tags = {"raydpo.source_digest": source_digest()}
    try:
        head = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5)  # fmt: skip
        if head.returncode == 0 and head.stdout.strip():
            dirty = subprocess.run(["git", "-C", str(PACKAGE_DIR), "status", "--porcelain", "--", "."],
                                   capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
            tags["git.revision"] = head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def source_digest() -> str:
    """sha256 (first 16 hex digits) over raydpo's .py files, by relative path: the code that ran,
    also where there is no git checkout (an installed wheel, a cluster image)."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(str(f.relative_to(PACKAGE_DIR)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


# Config sections every run logs as params; a method adds its own (Method.params: DPO's loss, PPO's ppo).
COMMON_SECTIONS = ("run_name", "method", "model", "data", "optim", "train", "scaling")


def run_tags(cfg: RunConfig, kind: str, sections: tuple[str, ...] = ()) -> dict[str, str]:
    tags = {
        KIND_TAG: kind,
        "method": cfg.method,
        RUN_DIR_TAG: cfg.run_location,
        "raydpo.version": __version__,
        "ray.version": ray.__version__,
        "num_workers": str(cfg.scaling.num_workers),
        **code_revision(),
    }
    if "loss" in sections:  # the DPO family: sortable by loss and β
        tags.update(loss="+".join(cfg.loss.names), beta=str(cfg.loss.beta))
    return tags


def run_key(where: str | Path) -> str:
    """The RUN_DIR_TAG value of a run: a storage URI as it is (`RunConfig.run_location`), else absolute."""
    return str(where) if "://" in str(where) else str(Path(where).resolve())


def find_or_create_run(
    tracking: TrackingConfig, run_dir: str | Path, run_name: str, tags: dict[str, str], params: dict[str, Any]
) -> str:
    """The MLflow run tagged with this run directory (or storage location): the existing one (set RUNNING
    again), else a new run with these tags and params. One directory, one run: restarts never duplicate."""
    client = _client(tracking_uri(tracking))
    exp_id = experiment_id(client, tracking.experiment)
    key = run_key(run_dir)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{key}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags, params = redact_mapping(tags), redact_mapping(params)  # secrets never reach MLflow
    run = client.create_run(exp_id, run_name=run_name, tags={**tags, RUN_DIR_TAG: key})
    from mlflow.entities import Param

    items = [Param(k, _param(redact(str(v)))) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def run_id_for(tracking: TrackingConfig, run_dir: Path) -> str | None:
    """The id of the MLflow run of `run_dir`, if there is one (nothing is created or changed)."""
    client = _client(tracking_uri(tracking))
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is None:
        return None
    key = run_key(run_dir)
    found = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{key}'", max_results=1
    )
    return found[0].info.run_id if found else None


def start_or_resume_run(
    cfg: RunConfig, method, kind: str = "train", parent_run_id: str | None = None,
    tags: dict[str, str] | None = None, run_name: str | None = None,
) -> str | None:  # fmt: skip
    """The MLflow run of this training run (None when tracking is off). Params: the common config
    sections and the method's own (`method.params`), not the whole tree (config.yaml has it all)."""
    if not cfg.tracking.enabled:
        return None
    tags = {**run_tags(cfg, kind, method.params), **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    full = config_to_dict(cfg)
    params = flatten({k: full[k] for k in COMMON_SECTIONS + tuple(method.params)})
    return find_or_create_run(cfg.tracking, cfg.run_location, run_name or cfg.run_name, tags, params)


def _param(v: Any) -> str:
    return str(v)[:6000]


def dataset_digest(source: str) -> str:
    """sha256 (first 16 hex digits) of a local file's bytes, of a directory's file names and sizes,
    or of the name itself (builtin and hub sources)."""
    h, path = hashlib.sha256(), Path(source)
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
    else:
        h.update(source.encode())
    return h.hexdigest()[:16]


class RunLogger:
    """Logs step metrics and artifacts to one MLflow run (used on rank 0 and on the driver).

    With a `spool` path, step metrics go through a `MetricSpool` (rank 0 of a training run): a file on
    the run's disk, sent from there in the background, so the store being down never stops training.
    """

    def __init__(self, uri: str, run_id: str | None, spool: Path | None = None):
        self.uri, self.run_id = uri, run_id
        self._client: MlflowClient | None = None
        self._sampler: _SystemMetrics | None = None
        self.spool = MetricSpool(uri, run_id, spool) if run_id and spool else None

    @property
    def client(self) -> MlflowClient | None:
        """This run's client, made on first use (None without a run). Rank 0 of a training run logs
        only through its spool and sampler, whose threads make their own: importing MLflow (about 1 s
        of CPU) then never delays its first step."""
        if self._client is None and self.run_id:
            self._client = _client(self.uri)
        return self._client

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.spool:
            self.spool.put(metrics, step)
            return
        if not self.client:
            return
        from mlflow.entities import Metric

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

    def set_description(self, text: str) -> None:
        """The run's description (the Markdown note at the top of its page in the UI)."""
        if self.client:
            self.client.set_tag(self.run_id, "mlflow.note.content", redact(text))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.client:
            for k, v in redact_mapping(tags).items():
                self.client.set_tag(self.run_id, k, redact(str(v)))

    def log_dataset(self, source: str, context: str, profile: dict[str, Any]) -> None:
        """The data a run read, as an MLflow dataset input: source, digest, and a profile (rows kept
        and quarantined). Logged once per (digest, context): a resumed run does not add it again."""
        if not self.client:
            return
        digest = dataset_digest(source)
        logged = self.client.get_run(self.run_id).inputs.dataset_inputs
        if any(d.dataset.digest == digest for d in logged):
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        kind = "builtin" if source.startswith("builtin:") else "local" if Path(source).exists() else "hf"
        where = source if kind != "local" else str(Path(source).resolve())
        ds = Dataset(name=Path(source).name or source, digest=digest, source_type=kind,
                     source=json.dumps({"uri": where}), profile=json.dumps(profile))  # fmt: skip
        inputs = [DatasetInput(ds, [InputTag("mlflow.data.context", context)])]
        try:
            self.client.log_inputs(self.run_id, inputs)
        except MlflowException:
            # Two runs of one experiment (sweep trials) adding the same dataset at once race on the store's
            # experiment-level dataset row (SQLite: "UNIQUE constraint failed"); once that row exists,
            # a second try only links it to this run.
            time.sleep(1.0)
            self.client.log_inputs(self.run_id, inputs)

    def log_model(self, final_dir: Path, mode: str, stored: str | None = None) -> None:
        """The final model: "reference" tags its absolute location (file URI, or `stored`: its copy on the
        run's storage, such as s3://...) and logs its config.json; "artifacts" copies the whole directory
        into the run's artifacts under model/ (registrable from `runs:/<run id>/model`); "none": neither."""
        if not self.client or mode == "none":
            return
        self.set_tags({"raydpo.final_model": str(final_dir),
                       "raydpo.final_model_uri": stored or final_dir.as_uri()})  # fmt: skip
        if mode == "artifacts":
            self.client.log_artifacts(self.run_id, str(final_dir), "model")
        else:
            self.log_artifact(final_dir / "config.json", "final_model")

    def start_system_metrics(self, interval_s: float | None) -> None:
        """Sample this process's and its machine's CPU and memory every `interval_s` seconds into
        system/* metrics (and once more at `finish`); None or 0 = off."""
        if self.run_id and interval_s:
            self._sampler = _SystemMetrics(self.uri, self.run_id, interval_s)

    def finish(self, status: str = "FINISHED") -> None:
        if self._sampler:
            self._sampler.stop()
            self._sampler = None
        if self.spool:
            self.spool.close()
        if self.client:
            self.client.set_terminated(self.run_id, status=status)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the samplers and send what is spooled, without ending the run (rank 0's part; the
        driver sends what is left afterwards, see `drain_spool`)."""
        if self._sampler:
            self._sampler.stop()
            self._sampler = None
        if self.spool:
            self.spool.close(timeout_s, quiet=True)


def drain_spool(uri: str, run_id: str | None, path: Path, timeout_s: float = 60.0) -> int:
    """On the driver after training: send what rank 0's spool still holds (see MetricSpool.close)."""
    if not run_id or not Path(path).is_file():
        return 0
    return MetricSpool(uri, run_id, path).close(timeout_s)


THROUGH_TAG = "raydpo.metrics_through"  # the last step whose metrics the store holds (MetricSpool)


class MetricSpool:
    """Step metrics appended to a JSON-lines file and sent to MLflow from it by a daemon thread.

    Exactly once, across outages and restarts: lines go out in step order, each batch together with
    the run tag `raydpo.metrics_through` = its last step, and a sender skips every line whose step
    is not above that tag. So an outage of any length only delays metrics (the thread retries with
    backoff; `put` never blocks or raises), a restarted worker resends what was spooled but not
    sent, and steps replayed after a resume from an older checkpoint are not logged twice. A line
    sent twice (a crash between the store's commit and the tag) carries its original timestamp,
    which the store deduplicates.
    """

    def __init__(self, uri: str, run_id: str, path: Path, batch: int = 500):
        self.uri, self.run_id, self.path, self.batch = uri, run_id, Path(path), batch
        self.client: MlflowClient | None = None  # made by the sending thread (RunLogger.client)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        self._offset, self._through, self._lock, self._deadline = 0, None, threading.Lock(), 0.0
        self._wake, self._stop = threading.Event(), threading.Event()
        self.unsent_error: str | None = None  # the last send error, None when the store is up
        self._thread = threading.Thread(target=self._run, daemon=True, name="raydpo-metric-spool")
        self._thread.start()

    def put(self, metrics: dict[str, float], step: int) -> None:
        line = json.dumps(
            {"step": step, "ts": int(time.time() * 1000), "m": {k: float(v) for k, v in metrics.items()}}
        )
        with self._lock, open(self.path, "a") as f:
            f.write(line + "\n")
        self._wake.set()

    def _pending(self) -> list[dict]:
        with self._lock, open(self.path) as f:
            f.seek(self._offset)
            text = f.read()
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):  # a line being written: next time
            lines = lines[:-1]
        out, pos = [], self._offset
        for raw in lines:
            pos += len(raw.encode())
            try:
                out.append({**json.loads(raw), "_end": pos})
            except ValueError:  # a torn line from a killed writer: skip it
                out.append({"step": None, "_end": pos})
        return out

    def _send(self) -> bool:
        """Send what is pending; True when nothing is left."""
        if self.client is None:
            self.client = _client(self.uri)
        from mlflow.entities import Metric, RunTag

        if self._through is None:
            tag = self.client.get_run(self.run_id).data.tags.get(THROUGH_TAG)
            self._through = int(tag) if tag is not None else -1
        pending = self._pending()
        i = 0
        while i < len(pending):
            chunk, metrics, last = [], [], None
            while i < len(pending) and len(metrics) < self.batch:
                line = pending[i]
                i += 1
                chunk.append(line)
                if line["step"] is None or line["step"] <= (self._through if last is None else last):  # torn,
                    #   already in the store, or replayed after a resume from an older checkpoint
                    continue
                last = line["step"]
                metrics += [Metric(k, v, line["ts"], line["step"]) for k, v in line["m"].items()]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics, tags=[RunTag(THROUGH_TAG, str(last))])
                self._through = last
            self._offset = chunk[-1]["_end"]
        return True

    def _run(self) -> None:
        self._wake.wait()  # the first send (and MLflow's import) waits for a line or `close`, not setup
        delay = 1.0
        while True:
            self._wake.clear()
            try:
                self._send()
                self.unsent_error, delay = None, 1.0
            except Exception as e:  # the store is down or refuses: keep the lines, retry later
                self.unsent_error, delay = (
                    f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                    min(delay * 2, 30.0),
                )
            if self._stop.is_set() and (self.unsent_error is None or self._deadline < time.monotonic()):
                return
            self._wake.wait(timeout=delay)

    def close(self, timeout_s: float = 60.0, quiet: bool = False) -> int:
        """Send what is spooled (waiting up to `timeout_s` for the store) and stop. Returns the number of
        lines left unsent; they stay in the file and go out with the next command on this run."""
        self._deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s + 5)
        through = self._through if self._through is not None else -1
        left = len([x for x in self._pending() if x["step"] is not None and x["step"] > through])
        if left and not quiet:
            print(f"raydpo: {left} metric rows not yet in MLflow ({self.unsent_error}); they stay in "
                  f"{self.path} and are sent by the next command on this run", file=sys.stderr)  # fmt: skip
        return left


class _SystemMetrics:
    """A daemon thread logging system/cpu_utilization_percentage, system/system_memory_usage_megabytes,
    system/process_rss_megabytes (and system/gpu_max_memory_allocated_megabytes on CUDA), with its
    own MLflow client (it runs beside the training loop's)."""

    def __init__(self, uri: str, run_id: str, interval_s: float):
        self.uri, self.run_id, self.interval = uri, run_id, interval_s
        self.client: MlflowClient | None = None  # made at the first sample, in the sampling thread
        self.proc, self.step = psutil.Process(), 0
        self._stop = threading.Event()
        psutil.cpu_percent(None)  # the first call only starts the measurement interval
        self._thread = threading.Thread(target=self._run, daemon=True, name="raydpo-system-metrics")
        self._thread.start()

    def _sample(self) -> None:
        if self.client is None:
            self.client = _client(self.uri)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(None),
            "system/system_memory_usage_megabytes": psutil.virtual_memory().used / 2**20,
            "system/process_rss_megabytes": self.proc.memory_info().rss / 2**20,
        }
        if torch.cuda.is_available():
            values["system/gpu_max_memory_allocated_megabytes"] = torch.cuda.max_memory_allocated() / 2**20
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, self.step) for k, v in values.items()]
        )
        self.step += 1

    def _sample_quietly(self) -> None:
        """A sample, or none while the store is down: samples are not spooled, and never stop training."""
        try:
            self._sample()
        except Exception:  # MLflow's own errors, network errors
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample_quietly()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample_quietly()


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
