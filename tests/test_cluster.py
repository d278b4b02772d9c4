"""A local two-node cluster (`raydpo cluster up`, raydpo/cluster.py) with an S3-compatible server, and
what a user runs on it with `ray job submit`.

One cluster and one S3 server (moto's server mode on 127.0.0.1) serve the whole module: a head and one
worker node, each with one `train_slot`, both with token authentication, and an MLflow server whose
artifacts go to the bucket. Three jobs run on it:

1. `raydpo train`, 2 workers, one per node (`scaling.resources_per_worker={train_slot: 1}`), 4 steps of
   2 × 4 pairs, checkpoints on S3 (`train.storage_path`), the final model into MLflow's artifacts;
2. the same run started again for 6 steps with a new, empty `train.output_dir`: it resumes from the
   checkpoint on S3 at step 4, into the same MLflow run;
3. `raydpo sweep sweeps/tiny.yaml` over two β, one 1-worker trial per node, checkpoints on S3.
The two-node run's six losses (steps 1-4 from job 1, 5-6 from job 2) equal those of the sweep's trial
with the same β and seed, a single-node run of 1 worker × 8 pairs (raydpo holds 2 workers × batch 4 =
1 worker × batch 8: tests/test_ray_train.py).

Safe on a shared machine: the cluster has its own HOME (which must hold no `.ray` at the end), Ray
temp folders, ports and token file; teardown stops exactly the processes `up` started
(`raydpo.cluster.down`) and checks that none is left. No `ray stop`.
"""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from raydpo import cluster
from raydpo.cli import main
from raydpo.errors import UserError

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent
ROOT = Path(__file__).parents[1]
BUCKET = "raydpo-test"
RUN = "two-node"
WORKERS = (
    "/api/v0/actors?limit=10000&filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker"
)


def s3_client(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])  # fmt: skip


def keys(env: dict, prefix: str) -> list[str]:
    pages = s3_client(env).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with one bucket; the AWS variables that point boto3, pyarrow and
    MLflow at it."""
    port = cluster.free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
    env = {"AWS_ENDPOINT_URL": url, "MLFLOW_S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    try:
        end = time.time() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                assert time.time() < end, f"moto's server did not answer at {url}"
                time.sleep(0.3)
        s3_client(env).create_bucket(Bucket=BUCKET)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own process group, started above
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


@pytest.fixture(scope="module")
def local_cluster(s3, tmp_path_factory):
    """`raydpo cluster up` (head + 1 worker node, MLflow artifacts on S3) with its own HOME; the `ray job`
    environment of a submitter (the cluster's address and token file, nothing from the user's HOME)."""
    root, home = tmp_path_factory.mktemp("cluster"), tmp_path_factory.mktemp("home")
    t0 = time.time()
    with pytest.MonkeyPatch.context() as mp:  # what `up` hands to the nodes and the MLflow server
        for k, v in {**s3, "HOME": str(home)}.items():
            mp.setenv(k, v)
        state = cluster.up(
            root, workers=1, cpus=2, artifacts=f"s3://{BUCKET}/mlartifacts", log=lambda *_: None
        )
    print(f"cluster up in {time.time() - t0:.0f} s")
    env = {k: v for k, v in os.environ.items() if k not in cluster.FOREIGN}
    env.update(cluster.client_env(state), HOME=str(home))
    try:
        yield SimpleNamespace(state=state, env=env, root=root, home=home)
    finally:
        t0 = time.time()
        cluster.down(root, log=lambda *_: None)
        print(f"cluster down in {time.time() - t0:.0f} s")
        assert not cluster._ours(state), "a process of the cluster survived `down`"
        assert not Path(state["ray_temp"]).exists()
        assert not (home / ".ray").exists(), (
            "something wrote ~/.ray: the token must come from the state folder"
        )


def submit(c, args: list[str], working_dir: Path | None = None) -> tuple[str, dict]:
    """`ray job submit ... -- python -m raydpo ARGS` as a user types it; (its output, the job's record)."""
    wd = ["--working-dir", str(working_dir)] if working_dir else []
    cmd = [str(BIN / "ray"), "job", "submit", *wd, "--", "python", "-m", "raydpo", *args]
    r = subprocess.run(cmd, env=c.env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    sid = re.search(r"Job '(raysubmit_\w+)' submitted successfully", out).group(1)
    job = cluster.api(c.state, f"/api/jobs/{sid}")
    assert job["status"] == "SUCCEEDED", job
    return out, job


def worker_nodes(c, job: dict) -> list[str]:
    """The node of every Ray Train worker the job ran, from Ray's state API."""
    return [a["node_id"] for a in cluster.api(c.state, WORKERS) if a["job_id"] == job["job_id"]]


def losses(client, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))


def common(tiny_llama_dir) -> list[str]:
    return [f"model.policy={tiny_llama_dir}", "data.max_length=48", "data.max_prompt_length=24"]


def train_args(tiny_llama_dir, out: Path, steps: int) -> list[str]:
    return ["train", str(ROOT / "configs" / "tiny.yaml"), *common(tiny_llama_dir), f"run_name={RUN}",
            "scaling.num_workers=2", "scaling.resources_per_worker={train_slot: 1}", "train.batch_size=4",
            f"train.max_steps={steps}", "train.checkpoint_every=2", f"train.output_dir={out}",
            f"train.storage_path=s3://{BUCKET}/runs", "tracking.experiment=cluster-train",
            "tracking.log_model=artifacts"]  # fmt: skip


@pytest.fixture(scope="module")
def two_node_run(local_cluster, tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs-a")
    t0 = time.time()
    log, job = submit(local_cluster, train_args(tiny_llama_dir, out, steps=4))
    print(f"job 1 in {time.time() - t0:.0f} s")
    return SimpleNamespace(out=out, log=log, job=job)


@pytest.fixture(scope="module")
def resumed_run(local_cluster, two_node_run, tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs-b") / "new"  # does not exist: no local state at all
    t0 = time.time()
    log, job = submit(local_cluster, train_args(tiny_llama_dir, out, steps=6))
    print(f"job 2 in {time.time() - t0:.0f} s")
    return SimpleNamespace(out=out, log=log, job=job)


# ----------------------------------------------------------------------------- the cluster itself


def test_cluster_is_up_on_loopback_only_and_up_twice_is_refused(local_cluster, capsys):
    st = cluster.status(local_cluster.root)
    assert all(st["alive"].values()) and set(st["alive"]) == {"mlflow", "head", "worker-1"}
    assert st["ray_nodes_alive"] == 2
    listening = []
    for p in cluster._ours(st):
        try:
            listening += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]  # fmt: skip
        except psutil.NoSuchProcess:  # a short-lived Ray worker that ended after it was listed
            continue
    assert len(listening) >= 6  # GCS, two raylets, dashboard, agents, MLflow, ...
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1") for _, ip in listening), listening
    with pytest.raises(UserError, match="already up"):
        cluster.up(local_cluster.root)
    assert main(["cluster", "status", "--dir", str(local_cluster.root)]) == 0
    shown = capsys.readouterr().out
    assert local_cluster.state["dashboard"] in shown and "Ray nodes alive: 2 of 2" in shown


def test_submission_without_the_token_is_refused(local_cluster):
    """No token, or a wrong one: the head turns the submitter away, and says why."""
    bare = {k: v for k, v in local_cluster.env.items() if not k.startswith("RAY_AUTH")}
    wrong = {**local_cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    for env, why in ((bare, "Missing authentication token"), (wrong, "Invalid authentication token")):
        r = subprocess.run([str(BIN / "ray"), "job", "list"], env=env, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
        assert r.returncode != 0 and why in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]


def test_unwritable_storage_fails_before_ray_starts(s3, tiny_llama_dir, tmp_path, monkeypatch, capsys):
    for k, v in s3.items():
        monkeypatch.setenv(k, v)
    rc = main(["train", str(ROOT / "configs" / "tiny.yaml"), *common(tiny_llama_dir),
               "tracking.enabled=false", f"train.output_dir={tmp_path}",
               "train.storage_path=s3://no-such-bucket/runs"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("raydpo: error: train.storage_path=s3://no-such-bucket/runs: cannot write there")
    assert not any(tmp_path.iterdir())  # refused before the run folder was made


# ----------------------------------------------------------------------------- jobs


def test_two_node_job_checkpoints_on_s3_and_tracks_to_the_server(local_cluster, two_node_run, s3):
    from mlflow.tracking import MlflowClient

    assert "step 4/4" in two_node_run.log and f"s3://{BUCKET}/runs/{RUN}/final" in two_node_run.log
    nodes = worker_nodes(local_cluster, two_node_run.job)
    alive = {n["node_id"] for n in cluster.api(local_cluster.state, "/api/v0/nodes")}
    assert len(nodes) == 2 and len(set(nodes)) == 2 and set(nodes) == alive  # one worker on each node

    client = MlflowClient(tracking_uri=local_cluster.state["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("cluster-train").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    tags = runs[0].data.tags
    assert tags["raydpo.run_dir"] == f"s3://{BUCKET}/runs/{RUN}" and tags["num_workers"] == "2"
    assert tags["raydpo.final_model_uri"] == f"s3://{BUCKET}/runs/{RUN}/final"
    assert [s for s, _ in losses(client, runs[0].info.run_id)] == [1, 2, 3, 4]

    stored = keys(s3, f"runs/{RUN}/")
    checkpoints = {k.split("/")[2] for k in stored if re.match(rf"runs/{RUN}/checkpoint_[^/]+/", k)}
    assert len(checkpoints) == 2  # steps 2 and 4 (train.num_to_keep=2)
    assert all(f"runs/{RUN}/{c}/manifest.json" in stored for c in checkpoints)
    assert not list(two_node_run.out.glob(f"{RUN}/checkpoint_*"))  # on S3 only
    # the final model in MLflow's artifacts: on the bucket, written by the server, read back through it
    artifacts = keys(s3, "mlartifacts/")
    assert any(k.endswith(f"{runs[0].info.run_id}/artifacts/model/model.safetensors") for k in artifacts)
    got = client.download_artifacts(runs[0].info.run_id, "model/config.json", str(two_node_run.out))
    assert Path(got).read_text() == (two_node_run.out / RUN / "final" / "config.json").read_text()


def test_second_run_resumes_from_s3_with_no_local_state(
    local_cluster, two_node_run, resumed_run, s3, tmp_path
):
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    assert "step 5/6" in resumed_run.log and "step 1/6" not in resumed_run.log  # resumed at step 4
    assert not list(resumed_run.out.glob(f"{RUN}/checkpoint_*"))
    assert len(set(worker_nodes(local_cluster, resumed_run.job))) == 2
    client = MlflowClient(tracking_uri=local_cluster.state["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("cluster-train").experiment_id])
    assert len(runs) == 1, "the resumed run opened a second MLflow run"
    assert [s for s, _ in losses(client, runs[0].info.run_id)] == [1, 2, 3, 4, 5, 6]

    # the final model read back from S3: what the driver exported from the step-6 checkpoint
    s3c, down = s3_client(s3), tmp_path / "final"
    down.mkdir()
    for key in keys(s3, f"runs/{RUN}/final/"):
        if not key.endswith("/"):  # folder markers
            s3c.download_file(BUCKET, key, str(down / key.rsplit("/", 1)[1]))
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in down.iterdir()}
    read = load_file(down / "model.safetensors")
    exported = load_file(resumed_run.out / RUN / "final" / "model.safetensors")
    first = load_file(two_node_run.out / RUN / "final" / "model.safetensors")
    assert read.keys() == exported.keys() and all(torch.equal(read[k], exported[k]) for k in read)
    assert not all(torch.equal(read[k], first[k]) for k in read)  # two more steps than job 1's model
    assert AutoModelForCausalLM.from_pretrained(down).num_parameters() > 0


def test_sweep_on_two_nodes_equals_the_two_node_run(local_cluster, resumed_run, tiny_llama_dir, tmp_path, s3):
    """The sweep runs as documented (`--working-dir .`, a sweep file of the repository); its trials sit
    on different nodes, and its β = 0.1 trial (1 worker × 8 pairs, one node) has the losses of the
    two-node run (2 workers × 4 pairs, resumed from S3 half-way)."""
    from mlflow.tracking import MlflowClient

    t0 = time.time()
    trial = "trial={num_workers: 1, cpus_per_worker: 1, resources_per_worker: {train_slot: 1}}"
    args = ["sweep", "sweeps/tiny.yaml", "name=cluster-sweep", "search={loss.beta: {grid: [0.1, 0.5]}}",
            "scheduler={type: fifo}", trial, *common(tiny_llama_dir), "train.max_steps=6",
            f"train.output_dir={tmp_path}", f"train.storage_path=s3://{BUCKET}/sweeps",
            "tracking.experiment=cluster-sweep"]  # fmt: skip
    log, job = submit(local_cluster, args, working_dir=ROOT)
    print(f"sweep job in {time.time() - t0:.0f} s")
    assert "trial 2/2 finished" in log
    nodes = worker_nodes(local_cluster, job)
    assert len(nodes) == 2 and len(set(nodes)) == 2  # the two trials' workers, one on each node

    client = MlflowClient(tracking_uri=local_cluster.state["mlflow"])
    trials = client.search_runs([client.get_experiment_by_name("cluster-sweep").experiment_id],
                                filter_string="tags.`raydpo.kind` = 'trial'")  # fmt: skip
    assert sorted(r.data.tags["sweep.loss.beta"] for r in trials) == ["0.1", "0.5"]
    trial = next(r for r in trials if r.data.tags["sweep.loss.beta"] == "0.1")
    assert trial.data.tags["raydpo.run_dir"].startswith(f"s3://{BUCKET}/sweeps/cluster-sweep/trials/")
    assert any("/checkpoint_" in k for k in keys(s3, "sweeps/cluster-sweep/trials/"))
    train = client.search_runs([client.get_experiment_by_name("cluster-train").experiment_id])[0]
    one_node, two_nodes = losses(client, trial.info.run_id), losses(client, train.info.run_id)
    assert [s for s, _ in one_node] == [s for s, _ in two_nodes] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in one_node] == pytest.approx([v for _, v in two_nodes], abs=1e-5)
    assert one_node[0][1] != one_node[-1][1]  # it trained
