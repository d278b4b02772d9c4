"""`ray job submit ... -- python -m raydpo train` against a real head node, tracking to a real
MLflow server; both bound to 127.0.0.1, the head with token authentication.

Safe on a shared machine: the head runs with its own HOME (its token is `<tmp home>/.ray/auth_token`,
never the token file in the user's own home), its own `--temp-dir` and free ports, as a child process group
of this test (`ray start --block` in a new session). Teardown stops exactly that group (and any of its
descendants that left it), never `ray stop`, so other Ray clusters of the user keep running. The test
talks to the head only through the `ray` CLI in subprocesses, so an in-process Ray does not matter.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent
# Where Ray would read a token or address from other than the head's HOME: never inherited.
RAY_VARS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_AUTH_MODE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path | None = None, timeout: float = 90) -> None:
    """Until `url` answers; fails at once when `proc` (the server behind it) has exited."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{proc.args[:3]} exited ({proc.returncode}) before {url} answered\n{tail}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:  # it answers (401 without a token): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def wait_job_agent(env: dict, timeout: float = 120) -> None:
    """The dashboard answers before its job agent is up ("No available agent to submit job"): submit a
    trivial job until one goes through."""
    end = time.time() + timeout
    r = None
    while time.time() < end:
        cmd = [BIN / "ray", "job", "submit", "--", sys.executable, "-c", "print('ready')"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if r.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"no job agent at {env['RAY_ADDRESS']}: {r and (r.stdout + r.stderr)[-2000:]}")


def start_group(cmd: list, env: dict, log: Path) -> subprocess.Popen:
    """`cmd` as the leader of a new session (and process group) that this test owns."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip


def stop_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM to the process group `proc` leads, SIGKILL to whatever is left of it after `timeout`;
    then SIGKILL to any descendant of `proc` that moved to a group of its own. Nothing else is touched."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []

    def signal_group(sig: int) -> None:
        try:  # the group id stays reserved while any member lives, so this reaches only our group
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    signal_group(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        signal_group(signal.SIGKILL)
        proc.wait(30)
    _, alive = psutil.wait_procs(descendants, timeout=timeout)
    signal_group(signal.SIGKILL)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=30)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """(dashboard address, env for `ray job` calls: the head's HOME, RAY_AUTH_MODE=token, RAY_ADDRESS)."""
    home = tmp_path_factory.mktemp("ray-home")
    temp_dir = tempfile.mkdtemp(prefix="rdp", dir="/tmp")  # short: Ray's socket paths must stay < ~100 chars
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARS}
    env.update(HOME=str(home), RAY_AUTH_MODE="token")
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    assert (home / ".ray" / "auth_token").is_file()
    dash = free_port()
    ports = {p: free_port() for p in ("port", "ray-client-server-port", "dashboard-agent-listen-port",
                                      "metrics-export-port")}  # fmt: skip
    cmd = [BIN / "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
           *(f"--{k}={v}" for k, v in ports.items()), "--num-cpus=4", "--disable-usage-stats"]  # fmt: skip
    log = home / "ray-start.log"
    head = start_group(cmd, env, log)
    try:
        address = f"http://127.0.0.1:{dash}"
        wait_http(f"{address}/api/version", head, log)
        env["RAY_ADDRESS"] = address
        wait_job_agent(env)
        yield address, env
    finally:
        stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--default-artifact-root", str(root / "art")]  # fmt: skip
    log = root / "server.log"
    proc = start_group(cmd, os.environ.copy(), log)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc)


def test_job_submit_trains_and_tracks(ray_head, mlflow_server, tmp_path, tiny_llama_dir):
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    out = tmp_path / "runs"
    cmd = [BIN / "ray", "job", "submit", "--address", address, "--", sys.executable, "-m", "raydpo", "train",
           f"model.policy={tiny_llama_dir}", "run_name=job", "train.max_steps=3", "train.batch_size=4",
           "scaling.num_workers=2", f"train.output_dir={out}", f"tracking.tracking_uri={mlflow_server}",
           "tracking.experiment=jobs", "data.max_length=48", "data.max_prompt_length=24"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 3/3" in r.stdout and "succeeded" in r.stdout + r.stderr
    assert (out / "job" / "final" / "model.safetensors").exists()

    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3]
    assert runs[0].data.tags["num_workers"] == "2"


def test_job_without_token_is_refused(ray_head):
    """The head requires the token: a submission without it is turned away."""
    address, env = ray_head
    bare = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    bare["HOME"] = str(Path(env["HOME"]) / "no-such-home")  # no .ray/auth_token under this HOME
    r = subprocess.run([BIN / "ray", "job", "list", "--address", address], env=bare, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr
    ok = subprocess.run(
        [BIN / "ray", "job", "list", "--address", address], env=env, capture_output=True, timeout=120
    )
    assert ok.returncode == 0  # the same call with the token goes through
