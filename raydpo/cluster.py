"""`raydpo cluster up|status|down`: a multi-node Ray cluster and an MLflow server on this machine.

For development and tests, with what a real cluster has: token authentication, more than one Ray
node (each its own `ray start` with its own resources, so Ray really places workers on different
nodes), and an MLflow tracking server that serves its artifacts (`--serve-artifacts`). Everything
binds 127.0.0.1. Everything lives in one state folder (`--dir`, default `$RAYDPO_HOME/cluster`):

    auth_token     the cluster's token (mode 0600). Nodes and submitters read it through
                   RAY_AUTH_TOKEN_PATH, so nothing depends on HOME and ~/.ray is never read or written
    cluster.json   addresses, ports, and each process started (pid = process group, start time)
    logs/          each process's console
    mlflow.db      the MLflow backend store (SQLite); artifacts in mlartifacts/ or at `--artifacts`

Ray's own temp folders are private (mkdtemp's `/tmp/rdp-<random>/<node>`: Ray's socket paths must
stay short).
Every process started carries RAYDPO_CLUSTER=<id> in its environment (Ray passes it to its workers).
`down` stops exactly those: the process groups `up` started, their descendants and any process
carrying this cluster's id; never `ray stop`, so other Ray clusters on the machine keep running.
Each node advertises one `train_slot`: `scaling.resources_per_worker={train_slot: 1}` puts one
training worker per node, as one GPU per node does on a GPU cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil

from raydpo.errors import UserError

SLOT = "train_slot"  # the custom resource each node advertises once
STATE, TOKEN = "cluster.json", "auth_token"
MARKER = "RAYDPO_CLUSTER"  # environment variable naming the cluster a process belongs to
# Where Ray or MLflow would otherwise read another cluster's address or token from: never inherited.
FOREIGN = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI")


def default_dir() -> Path:
    return Path(os.environ.get("RAYDPO_HOME", Path.home() / "raydpo")) / "cluster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this Python's environment (`ray`, `mlflow`), else one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise UserError(f"`{name}` is not installed in this environment (pip install raydpo brings it)")
    return found


def client_env(state: dict) -> dict[str, str]:
    """What a submitter or a driver needs to use the cluster: its address, its token, its MLflow."""
    env = {"RAY_ADDRESS": state["dashboard"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": state["token"]}
    if state.get("mlflow"):
        env["MLFLOW_TRACKING_URI"] = state["mlflow"]
    return env


def read_state(root: Path) -> dict:
    path = Path(root) / STATE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no cluster in {root} (start one with: raydpo cluster up --dir {root})") from None
    except ValueError as e:
        raise UserError(f"{path} is not a cluster state file ({e})") from None


# ----------------------------------------------------------------------------- processes


def _start(name: str, cmd: list[str], env: dict, root: Path, procs: list[dict]) -> subprocess.Popen:
    """`cmd` as the leader of a new session (and process group), its console in logs/<name>.log."""
    log = root / "logs" / f"{name}.log"
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)  # fmt: skip
    started = psutil.Process(p.pid).create_time()
    procs.append({"name": name, "pid": p.pid, "started": started, "log": str(log)})
    return p


def _ours(state: dict) -> list[psutil.Process]:
    """Every live process this cluster started: the recorded leaders (same pid and start time), their
    descendants, the members of their process groups and any process carrying the cluster's id."""
    found: dict[int, psutil.Process] = {}
    groups = set()
    for rec in state.get("processes", []):
        try:
            p = psutil.Process(rec["pid"])
            if abs(p.create_time() - rec["started"]) < 1:  # not a later process that got the same pid
                groups.add(rec["pid"])
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for p in psutil.process_iter():
        if p.pid in found or p.pid == os.getpid():
            continue
        try:
            if os.getpgid(p.pid) in groups or p.environ().get(MARKER) == state["id"]:
                found[p.pid] = p
        except (psutil.Error, OSError):
            pass
    return list(found.values())


def _stop(procs: list[psutil.Process], leaders: set[int], grace: float = 5.0) -> int:
    """SIGTERM to the leaders (`ray start --block` stops its node's processes in order; the MLflow
    server), then SIGKILL to whatever of `procs` is left after `grace` seconds (an MLflow server and some
    Ray workers outlast SIGTERM for many seconds); returns how many survived even that."""
    for p in procs:
        if p.pid in leaders:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(psutil.wait_procs(alive, timeout=30)[1])


# ----------------------------------------------------------------------------- waiting


def _get(url: str, token: str | None = None, timeout: float = 5.0) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return True


def api(state: dict, path: str):
    """GET `path` from the head's dashboard (jobs, Ray's state API under /api/v0/...) with the token;
    the state API's list, or the JSON as it is."""
    body = json.loads(_get(state["dashboard"] + path, Path(state["token"]).read_text().strip()))
    return body["data"]["result"]["result"] if path.startswith("/api/v0/") else body


NODE_START_ATTEMPTS = 3  # a worker node whose `ray start` gave up is started again, this many times in all


def _alive_nodes(state: dict) -> int:
    return sum(n.get("state") == "ALIVE" for n in api(state, "/api/v0/nodes?limit=1000"))


def _wait(what: str, ready, started: list[tuple[subprocess.Popen, dict]], timeout: float) -> None:
    """Until `ready()` is true; a UserError naming the process and its log when one of them exits."""
    end = time.time() + timeout
    while time.time() < end:
        for p, rec in started:
            if p.poll() is not None:
                tail = Path(rec["log"]).read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise UserError(f"{rec['name']} exited ({p.returncode}) before {what} was ready: "
                                f"{tail[0][:300]} (log: {rec['log']})")  # fmt: skip
        try:
            if ready():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise UserError(f"{what} not ready after {timeout:.0f} s (logs in {Path(started[0][1]['log']).parent})")


# ----------------------------------------------------------------------------- up / status / down


# Loopback only. Ray's servers (GCS, raylets, agents, workers) listen on 127.0.0.1 alone when their
# node's address is 127.0.0.1, and Python-side Ray keeps 127.0.0.1 as it is only while
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (otherwise ray._private.services.resolve_ip_for_localhost turns it
# into the machine's address); every process of the cluster gets that variable. `ray start` of a
# worker node refuses to run under it ("multi-node clusters are not supported on Windows and OSX"), so
# worker nodes run `ray start` with that one check passed and 127.0.0.1 kept. tests/test_cluster.py
# checks that every listening socket of the cluster is on 127.0.0.1.
RAY_START_WORKER = (
    "import sys; from ray._private import ray_constants, services; ray_constants.ENABLE_RAY_CLUSTER = True; "
    "services.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


def _stop_leftovers(temp: Path) -> None:
    """Stop every process of one node's failed `ray start` (they name its temp folder)."""
    mine = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(temp) in " ".join(p.info["cmdline"] or []):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    for p in psutil.wait_procs(mine, timeout=5)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _ray_node(i: int, state: dict, cpus: float) -> list[str]:
    """`ray start` for node i (0 = the head), with its own ports and temp folder."""
    node = "head" if i == 0 else f"worker-{i}"
    temp = Path(state["ray_temp"]) / ("h" if i == 0 else f"w{i}")
    ray = [_bin("ray")] if i == 0 else [sys.executable, "-c", RAY_START_WORKER]
    cmd = [*ray, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}",
           f"--num-cpus={cpus:g}", f"--resources={json.dumps({SLOT: 1})}", "--disable-usage-stats",
           f"--dashboard-agent-listen-port={state['ports'][node]['agent']}",
           f"--metrics-export-port={state['ports'][node]['metrics']}"]  # fmt: skip
    if i == 0:
        p = state["ports"]
        return cmd + ["--head", f"--port={p['gcs']}", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={p['dashboard']}",
                      f"--ray-client-server-port={p['client']}"]  # fmt: skip
    return cmd + [f"--address={state['gcs']}"]


def up(root: Path | None = None, workers: int = 1, cpus: float = 2, artifacts: str | None = None,
       mlflow: bool = True, timeout: float = 180, log=print) -> dict:  # fmt: skip
    """Start the head, `workers` more Ray nodes and (with `mlflow`) an MLflow server; returns the state.
    `artifacts`: where the server keeps artifacts (a folder or a URI such as s3://bucket/prefix;
    default <root>/mlartifacts). The processes get this process's environment (cloud credentials,
    AWS_ENDPOINT_URL, ...) less another cluster's address or token."""
    root = Path(root or default_dir()).resolve()
    if workers < 0 or cpus <= 0:
        raise UserError(f"cluster up: --workers must be >= 0 and --cpus > 0 (got {workers}, {cpus:g})")
    if (root / STATE).is_file():
        old = read_state(root)
        if _ours(old):
            raise UserError(f"a cluster is already up in {root} (raydpo cluster down --dir {root} stops it)")
        _forget(root, old)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    token = root / TOKEN
    if not token.is_file():  # a cluster started again keeps its token: submitters need no new one
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits
    nodes = ["head", *(f"worker-{i}" for i in range(1, workers + 1))]
    ports = {n: {"agent": free_port(), "metrics": free_port()} for n in nodes}
    ports.update(gcs=free_port(), dashboard=free_port(), client=free_port(), mlflow=free_port())
    state = {
        "id": uuid.uuid4().hex, "root": str(root), "token": str(token), "ports": ports, "nodes": nodes,
        "cpus_per_node": cpus, "gcs": f"127.0.0.1:{ports['gcs']}",
        "dashboard": f"http://127.0.0.1:{ports['dashboard']}",
        "mlflow": f"http://127.0.0.1:{ports['mlflow']}" if mlflow else None,
        "artifacts": (artifacts or (root / "mlartifacts").as_uri()) if mlflow else None,
        "ray_temp": tempfile.mkdtemp(prefix="rdp-", dir="/tmp"), "processes": [],
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update({MARKER: state["id"], "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})  # fmt: skip
    # `python` in a job's entrypoint is this environment's Python, as on an image with raydpo installed
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if mlflow:  # jobs and drivers on the cluster track to its server unless told otherwise
        env["MLFLOW_TRACKING_URI"] = state["mlflow"]
    started: list[tuple[subprocess.Popen, dict]] = []

    def launch(name: str, cmd: list[str]) -> None:
        p = _start(name, cmd, env, root, state["processes"])
        started.append((p, state["processes"][-1]))
        (root / STATE).write_text(json.dumps(state, indent=1))  # recorded before anything can go wrong

    secret = token.read_text().strip()
    try:
        if mlflow:  # first: it takes longest to import, and starts while Ray does
            launch("mlflow", [_bin("mlflow"), "server", "--host", "127.0.0.1",
                              "--port", str(ports["mlflow"]), "--workers", "1",
                              "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                              "--serve-artifacts",
                              "--artifacts-destination", state["artifacts"]])  # fmt: skip
        launch("head", _ray_node(0, state, cpus))
        _wait("the head's GCS", lambda: _accepts(ports["gcs"]), started, timeout)
        _wait("the Ray head", lambda: _get(f"{state['dashboard']}/api/version", secret), started, timeout)
        for i in range(1, workers + 1):  # after the head's dashboard: less for a loaded GCS to do at once
            launch(nodes[i], _ray_node(i, state, cpus))
        all_nodes = lambda: _alive_nodes(state) == len(nodes)  # noqa: E731
        for attempt in range(NODE_START_ATTEMPTS):
            try:
                _wait(f"{len(nodes)} Ray node(s)", all_nodes, started, timeout)
                break
            except UserError:
                # `ray start` gives a node 30 s to register with the GCS; on a loaded machine a worker
                # node can miss that while the head is still starting. Only such nodes are started again.
                dead = [(p, rec) for p, rec in started if p.poll() is not None]
                if (
                    attempt == NODE_START_ATTEMPTS - 1
                    or not dead
                    or any(r["name"] not in nodes[1:] for _, r in dead)
                ):
                    raise
                for p, rec in dead:
                    started.remove((p, rec))
                    i = nodes.index(rec["name"])
                    _stop_leftovers(Path(state["ray_temp"]) / f"w{i}")  # its raylet and agents, ports free
                    log(f"raydpo cluster: {rec['name']} did not register in time; starting it again")
                    launch(rec["name"], _ray_node(i, state, cpus))
        head_agent = f"http://127.0.0.1:{ports['head']['agent']}/api/healthz"  # the head's job agent
        _wait("the head's job agent", lambda: _get(head_agent, secret), started, timeout)
        if mlflow:
            _wait("the MLflow server", lambda: _get(f"{state['mlflow']}/health"), started, timeout)
    except BaseException:
        down(root, log=lambda *_: None)
        raise
    log(describe(state))
    return state


def _forget(root: Path, state: dict) -> None:
    shutil.rmtree(state.get("ray_temp") or "/nonexistent", ignore_errors=True)
    (root / STATE).unlink(missing_ok=True)


def status(root: Path | None = None) -> dict:
    """The state, plus which recorded processes are alive and how many Ray nodes the head sees."""
    root = Path(root or default_dir()).resolve()
    state = read_state(root)
    alive = {p.pid for p in _ours(state)}
    state["alive"] = {rec["name"]: rec["pid"] in alive for rec in state["processes"]}
    try:
        state["ray_nodes_alive"] = _alive_nodes(state)
    except (OSError, ValueError, KeyError):
        state["ray_nodes_alive"] = 0
    return state


def down(root: Path | None = None, log=print) -> int:
    """Stop every process of the cluster in `root`; returns how many were running. Logs, the token
    and the MLflow store stay."""
    root = Path(root or default_dir()).resolve()
    state = read_state(root)
    stopped = 0
    for _ in range(3):  # again for any process a dying node started while it was being stopped
        procs = _ours(state)
        if not procs:
            break
        stopped += len(procs)
        if left := _stop(procs, {rec["pid"] for rec in state["processes"]}):
            raise UserError(f"{left} process(es) of the cluster in {root} survived SIGKILL")
    _forget(root, state)
    log(f"cluster in {root} stopped ({stopped} processes); logs, token and MLflow store kept there")
    return stopped


def describe(state: dict) -> str:
    """Addresses, how to reach the cluster, and the `ray job submit` line."""
    env = client_env(state)
    nodes = ", ".join(state["nodes"])
    lines = [
        f"Ray cluster up: {len(state['nodes'])} node(s) ({nodes}), {state['cpus_per_node']:g} CPUs and "
        f"1 {SLOT} each",
        f"  dashboard and jobs: {state['dashboard']} (token authentication; token in {state['token']})",
        f"  Ray address for drivers here: {state['gcs']} (with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)",
    ]
    if state.get("mlflow"):
        store = f"{state['root']}/mlflow.db"
        lines.append(f"  MLflow: {state['mlflow']} (store {store}, artifacts {state['artifacts']})")
    lines += [
        "Use it from a shell:",
        "  export " + " ".join(f"{k}={v}" for k, v in env.items()),
        "  ray job submit --working-dir . -- python -m raydpo train configs/tiny.yaml scaling.num_workers=2 "
        f"'scaling.resources_per_worker={{{SLOT}: 1}}' train.output_dir=$PWD/runs",
        f"  ray job logs --follow <submission id>      # stop: raydpo cluster down --dir {state['root']}",
    ]
    return "\n".join(lines)
