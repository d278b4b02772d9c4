"""`ray job submit ... -- python -m raydpo train` against a real head node, tracking to a real
MLflow server; both bound to 127.0.0.1, the head with token authentication.

This module starts its own Ray head with `ray start` and ends it with `ray stop`, so it runs before
the modules that share the in-process Ray (test files run in name order).
"""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:  # it answers (401 without a token): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


def wait_job_agent(address: str, env: dict, timeout: float = 120) -> None:
    """The dashboard answers before its job agent is up ("No available agent to submit job"): submit a
    trivial job until one goes through."""
    end = time.time() + timeout
    while time.time() < end:
        cmd = [
            BIN / "ray",
            "job",
            "submit",
            "--address",
            address,
            "--",
            sys.executable,
            "-c",
            "print('ready')",
        ]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"no job agent at {address}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    import ray

    if ray.is_initialized():
        pytest.skip("an in-process Ray is running; `ray stop` would end it")
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    dash = free_port()
    cmd = [
        BIN / "ray",
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--port={free_port()}",
        f"--dashboard-port={dash}",
        "--num-cpus=4",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version")
        address = f"http://127.0.0.1:{dash}"
        wait_job_agent(address, env)
        yield address, env
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            BIN / "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "art"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
    bare["HOME"] = str(Path(env.get("HOME", "/root")) / "no-such-home")  # no ~/.ray/auth_token here
    r = subprocess.run([BIN / "ray", "job", "list", "--address", address], env=bare, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr
    ok = subprocess.run(
        [BIN / "ray", "job", "list", "--address", address], env=env, capture_output=True, timeout=120
    )
    assert ok.returncode == 0  # the same call with the token goes through
