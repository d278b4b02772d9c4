"""Faults injected from outside the training code: a Ray Train worker SIGKILLed, the driver SIGKILLed
and the command run again, a sweep driver SIGKILLed and resumed. Drivers run as subprocesses that
join the tests' shared Ray (RAY_ADDRESS), so killing one ends only that driver and its job. The
killed runs train a LoRA adapter (their checkpoints and export are the adapter; the reference is
the base model), so a LoRA run's restart and resume are tested here too."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def driver(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`python -m raydpo ARGS` in a session of its own (so it can be killed alone), output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "raydpo", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait_for(pred, timeout: float = 300.0, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended ({proc.returncode}) before the awaited moment")
        time.sleep(0.2)
    raise TimeoutError("the awaited moment did not come")


def spooled_steps(run_dir: Path) -> list[int]:
    path = run_dir / "mlflow-spool.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x)["step"] for x in path.read_text().splitlines() if x.endswith("}")]


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def driver_env(ray) -> dict:
    """The environment of a driver that joins the shared test Ray."""
    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def env(ray_local):
    return driver_env(ray_local)


def train_args(tiny_llama_dir, tmp_path, run_name: str, **extra) -> list[str]:
    over = {"model.policy": tiny_llama_dir, "run_name": run_name, "train.output_dir": tmp_path / "runs",
            "train.max_steps": 8, "train.batch_size": 4, "train.checkpoint_every": 2, "optim.lr": 1e-3,
            "data.max_length": 48, "data.max_prompt_length": 24, "scaling.num_workers": 2,
            "data.eval_fraction": 0.25, "train.eval_every": 2,  # a resumed run evaluates the same split
            "model.lora.r": 4,
            "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "f",
            **extra}  # fmt: skip
    return ["train", *(f"{k}={v}" for k, v in over.items())]


def mlflow_steps(tmp_path, run_name: str, metric: str = "loss"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("f").experiment_id],
                              filter_string=f"attributes.run_name = '{run_name}'")  # fmt: skip
    assert len(runs) == 1, [r.info.run_name for r in runs]
    hist = client.get_metric_history(runs[0].info.run_id, metric)
    return runs[0], {m.step: m.value for m in hist}, [m.step for m in hist]


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_dir, tmp_path_factory, ray_local):
    """The run without a fault, by step: the training losses (`.loss`) and eval losses (`.eval`) each
    interrupted run must follow."""
    from raydpo.config import load_config
    from raydpo.evaluate.checkpoints import train_and_evaluate

    out = tmp_path_factory.mktemp("uninterrupted")
    _, *overrides = train_args(tiny_llama_dir, out, "clean")  # what `raydpo train ...` runs, in this driver
    train_and_evaluate(load_config(None, overrides), log=lambda *_: None, stream=None)
    return SimpleNamespace(
        loss=mlflow_steps(out, "clean")[1], eval=mlflow_steps(out, "clean", "eval/loss")[1]
    )


def test_a_killed_worker_restarts_from_its_checkpoint_on_the_same_curve(tiny_llama_dir, tmp_path, env,
                                                                         uninterrupted):  # fmt: skip
    args = train_args(tiny_llama_dir, tmp_path, "w", **{"scaling.max_failures": 1})
    proc = driver(args, env, tmp_path / "w.log")
    try:
        wait_for(lambda: len(spooled_steps(tmp_path / "runs" / "w")) >= 3, proc=proc)
        ours = {p.pid for p in psutil.Process().children(recursive=True)}  # only this test's Ray
        workers = [p for p in psutil.process_iter(["pid", "name", "cmdline"])
                   if p.pid in ours and "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]  # fmt: skip
        assert len(workers) == 2
        os.kill(workers[1].pid, signal.SIGKILL)
        assert proc.wait(600) == 0, (tmp_path / "w.log").read_text()[-3000:]
    finally:
        kill_group(proc)
    run, losses, steps = mlflow_steps(tmp_path, "w")
    assert run.info.status == "FINISHED" and sorted(steps) == list(range(1, 9))  # each step once
    assert [losses[s] for s in range(1, 9)] == pytest.approx(
        [uninterrupted.loss[s] for s in range(1, 9)], abs=1e-5
    )
    assert losses[1] == pytest.approx(0.693147, abs=1e-5)  # LoRA adapters start at zero: policy = reference
    assert losses[8] < losses[1]
    from peft import AutoPeftModelForCausalLM

    final = tmp_path / "runs" / "w" / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    AutoPeftModelForCausalLM.from_pretrained(final)


def test_a_killed_driver_run_again_resumes_the_same_run(tiny_llama_dir, tmp_path, env, uninterrupted):
    args = train_args(tiny_llama_dir, tmp_path, "d")
    proc = driver(args, env, tmp_path / "d1.log")
    try:
        wait_for(lambda: len(spooled_steps(tmp_path / "runs" / "d")) >= 5, proc=proc)
    finally:
        kill_group(proc)  # the driver and the job it owns go, mid-run, after the step-4 checkpoint
    first, _, _ = mlflow_steps(tmp_path, "d")
    again = subprocess.run([sys.executable, "-m", "raydpo", *args], env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    run, losses, steps = mlflow_steps(tmp_path, "d")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert sorted(steps) == list(range(1, 9))  # every step once: none lost, none twice
    assert [losses[s] for s in range(1, 9)] == pytest.approx(
        [uninterrupted.loss[s] for s in range(1, 9)], abs=1e-5
    )
    _, evals, eval_steps = mlflow_steps(tmp_path, "d", "eval/loss")
    assert sorted(eval_steps) == sorted(uninterrupted.eval) == [0, 2, 4, 6, 8]  # each eval once
    want = [uninterrupted.eval[s] for s in eval_steps]
    assert [evals[s] for s in eval_steps] == pytest.approx(want, abs=1e-5)


def test_a_killed_sweep_driver_resumes_without_rerunning_finished_trials(tiny_llama_dir, tmp_path, env):
    from mlflow.tracking import MlflowClient

    base = {"model": {"policy": str(tiny_llama_dir)}, "optim": {"lr": 1e-3},
            "data": {"max_length": 48, "max_prompt_length": 24},
            "train": {"batch_size": 4, "max_steps": 4, "checkpoint_every": 2, "output_dir": str(tmp_path)},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment": "sw"}}  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"name": "s", "base": "base.yaml", "search": {"loss.name": {"grid": ["sigmoid", "hinge"]}},
             "metric": "loss", "trial": {"num_workers": 1}}  # fmt: skip
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    log = tmp_path / "s1.log"
    proc = driver(["sweep", str(tmp_path / "sweep.yaml")], env, log)
    try:
        wait_for(lambda: "trial 1/2 finished" in log.read_text(), proc=proc)
    finally:
        kill_group(proc)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.get_experiment_by_name("sw").experiment_id
    done = [r for r in client.search_runs([exp]) if r.data.tags.get("raydpo.kind") == "trial"
            and r.info.status == "FINISHED"]  # fmt: skip
    assert len(done) == 1
    # --resume after an override (the same value as the file's): accepted in any position
    cmd = [sys.executable, "-m", "raydpo", "sweep", str(tmp_path / "sweep.yaml"), "num_samples=1", "--resume"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    runs = client.search_runs([exp])
    trials = [x for x in runs if x.data.tags.get("raydpo.kind") == "trial"]
    assert len(trials) == 2 and all(x.info.status == "FINISHED" for x in runs)  # none left RUNNING
    same = next(x for x in trials if x.info.run_id == done[0].info.run_id)
    assert same.info.end_time == done[0].info.end_time  # the finished trial did not run again


def test_losing_the_node_of_a_worker_the_run_completes_on_what_is_left(tiny_llama_dir, tmp_path):
    """A simulated multi-node cluster (its own, in a subprocess): the node hosting the worker is
    removed mid-run; Ray Train restarts the worker on the node that is left, from the checkpoint."""
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = Path(__file__).parent / "node_loss.py"
    r = subprocess.run([sys.executable, str(script), str(tiny_llama_dir), str(tmp_path)], env=env,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stdout[-2000:] + r.stderr[-3000:]
    out = json.loads(line.removeprefix("RESULT "))
    assert out["errors"] == [] and out["removed_at"] is not None and out["removed_at"] < 8
    assert Path(out["final"], "model.safetensors").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("n").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 9))
