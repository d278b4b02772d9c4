"""A run directory holds one config: another is refused unless resumed explicitly; paths are absolute."""

import subprocess
import sys

import pytest
import yaml

from raydpo.config import build_config, dump_config
from raydpo.engine.launch import check_run_dir, resolve_paths
from raydpo.errors import UserError


def _cfg(tmp_path, **optim):
    return build_config({"run_name": "r", "train": {"output_dir": str(tmp_path / "runs")},
                         "optim": {"lr": 1e-3, **optim}})  # fmt: skip


def test_changed_config_is_refused_with_the_differing_fields(tmp_path):
    check_run_dir(_cfg(tmp_path), resume=False)  # a new run directory: config.yaml written
    check_run_dir(_cfg(tmp_path), resume=False)  # the same config again: resumes silently
    with pytest.raises(UserError, match=r"optim\.lr: 0\.001 -> 0\.0001.*--resume"):
        check_run_dir(_cfg(tmp_path, lr=1e-4), resume=False)
    saved = yaml.safe_load((tmp_path / "runs" / "r" / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-3  # never overwritten next to weights trained with another config


def test_explicit_resume_keeps_the_old_config_beside_the_new(tmp_path):
    check_run_dir(_cfg(tmp_path), resume=False)
    lines: list[str] = []
    check_run_dir(_cfg(tmp_path, lr=1e-4), resume=True, log=lines.append)
    run_dir = tmp_path / "runs" / "r"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == 1e-4
    assert yaml.safe_load((run_dir / "config.1.yaml").read_text())["optim"]["lr"] == 1e-3
    assert "optim.lr" in lines[0] and "config.1.yaml" in lines[0]


def test_cli_refuses_a_changed_rerun_before_starting_ray(tmp_path, tiny_llama_dir):
    cfg = build_config({"run_name": "r", "model": {"policy": str(tiny_llama_dir)},
                        "train": {"output_dir": str(tmp_path / "runs")}})  # fmt: skip
    dump_config(resolve_paths(cfg), tmp_path / "runs" / "r" / "config.yaml")
    args = [f"model.policy={tiny_llama_dir}", "run_name=r", f"train.output_dir={tmp_path / 'runs'}"]
    cmd = [sys.executable, "-m", "raydpo", "train", *args, "optim.lr=1e-4", "tracking.enabled=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "another config" in r.stderr and "optim.lr" in r.stderr and "--resume" in r.stderr


def test_paths_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "pairs.jsonl").write_text("")
    cfg = resolve_paths(build_config({"data": {"source": "pairs.jsonl", "quarantine_path": "q/bad.jsonl"},
                                      "tracking": {"tracking_uri": "sqlite:///sub/m.db"}}))  # fmt: skip
    assert cfg.data.source == str(tmp_path / "pairs.jsonl")
    assert cfg.data.quarantine_path == str(tmp_path / "q" / "bad.jsonl")
    assert cfg.train.output_dir == str(tmp_path / "runs")
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'sub' / 'm.db'}"
    assert resolve_paths(build_config({})).tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_paths(build_config({})).data.source == "builtin:tiny-prefs"  # not a path: unchanged


def test_under_a_ray_job_relative_outputs_go_to_raydpo_home(tmp_path, monkeypatch):
    job_dir = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "x"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("RAYDPO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    lines: list[str] = []
    cfg = resolve_paths(build_config({}), log=lines.append)
    assert cfg.train.output_dir == str(tmp_path / "home" / "runs")
    assert cfg.tracking.tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert lines and "ray job submit" in lines[0] and str(tmp_path / "home") in lines[0]


def test_resume_flag_is_accepted_before_or_after_overrides(monkeypatch):
    import raydpo.evaluate.checkpoints
    import raydpo.sweep
    from raydpo.cli import main

    seen: list = []
    monkeypatch.setattr(  # what `raydpo train` calls: methods.train, then any eval.every_steps
        raydpo.evaluate.checkpoints,
        "train_and_evaluate",
        lambda cfg, resume=False: seen.append((cfg.optim.lr, resume)),
    )
    fake_sweep = lambda path, overrides, resume: seen.append((path, overrides, resume)) or {"failed": 0}  # noqa: E731
    monkeypatch.setattr(raydpo.sweep, "run_sweep", fake_sweep)
    assert main(["train", "optim.lr=0.01", "--resume"]) == 0
    assert main(["train", "--resume", "optim.lr=0.02"]) == 0
    assert main(["sweep", "s.yaml", "--resume", "num_samples=2"]) == 0
    assert main(["sweep", "s.yaml", "num_samples=3", "--resume"]) == 0
    assert seen == [
        (0.01, True),
        (0.02, True),
        ("s.yaml", ["num_samples=2"], True),
        ("s.yaml", ["num_samples=3"], True),
    ]


def test_a_local_run_gives_its_workers_the_machine(monkeypatch):
    from raydpo.engine.launch import resolve_scaling

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpus = lambda **s: resolve_scaling(build_config({"scaling": s})).scaling.cpus_per_worker  # noqa: E731
    assert cpus() == 8.0 and cpus(num_workers=2) == 4.0 and cpus(num_workers=3) == 2.0
    assert cpus(num_workers=16) == 1.0 and cpus(cpus_per_worker=0.5) == 0.5  # a setting is kept
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cpus() == 1.0  # joining a cluster: one per worker unless told otherwise


def test_a_finished_run_run_again_trains_nothing(tmp_path, tiny_llama_dir):
    """A run directory holding a completed run with the same config: nothing is trained (no Ray is
    started) and the record of the finished run comes back, so a resumed sweep can report it."""
    from raydpo.engine.launch import FINISHED, resolve_scaling
    from raydpo.methods import train

    spec = {"run_name": "r", "model": {"policy": str(tiny_llama_dir)}, "tracking": {"enabled": False}}
    cfg = build_config({**spec, "train": {"output_dir": str(tmp_path / "runs")}})
    check_run_dir(resolve_scaling(resolve_paths(cfg)), resume=False)
    record = {
        "final_model": "/x/final",
        "mlflow_run_id": None,
        "total_steps": 7,
        "last_metrics": {"loss": 0.5},
    }
    (tmp_path / "runs" / "r" / FINISHED).write_text(__import__("json").dumps(record))
    lines: list[str] = []
    out = train(cfg, log=lines.append)
    assert out["already_finished"] and out["total_steps"] == 7 and out["last_metrics"] == {"loss": 0.5}
    assert "already finished (7 steps)" in lines[-1]
    check_run_dir(resolve_scaling(resolve_paths(cfg)), resume=False)  # same config: kept
    assert (tmp_path / "runs" / "r" / FINISHED).exists()
    more = build_config({**cfg.model_dump(mode="json"), "train": {**cfg.train.model_dump(), "max_steps": 9}})
    check_run_dir(
        resolve_scaling(resolve_paths(more)), resume=True
    )  # --resume with another config: not finished any more
    assert not (tmp_path / "runs" / "r" / FINISHED).exists()


def test_storage_path_names_the_run_and_stays_a_uri(tmp_path, monkeypatch):
    """With train.storage_path the run's checkpoints live at <storage_path>/<run_name>, and that location
    (not the local run directory) names the run in MLflow: started again elsewhere, it finds its run."""
    from raydpo.tracking import run_key, run_tags

    monkeypatch.chdir(tmp_path)
    s3 = resolve_paths(
        build_config({"run_name": "r", "train": {"storage_path": "s3://bucket/runs/"}}), log=None
    )
    assert s3.train.storage_path == "s3://bucket/runs/" and s3.run_location == "s3://bucket/runs/r"
    assert run_tags(s3, "train")["raydpo.run_dir"] == run_key(s3.run_location) == "s3://bucket/runs/r"
    shared = resolve_paths(build_config({"run_name": "r", "train": {"storage_path": "shared"}}), log=None)
    assert shared.run_location == str(tmp_path / "shared" / "r")  # a folder is made absolute
    plain = resolve_paths(build_config({"run_name": "r"}), log=None)
    assert plain.run_location == str(plain.run_dir) and run_key(plain.run_dir) == str(plain.run_dir)
    with pytest.raises(Exception, match="a folder, not a URI: put s3://b/x in train.storage_path"):
        build_config({"train": {"output_dir": "s3://b/x"}})


def test_a_dataset_two_runs_log_at_once_is_retried(tmp_path):
    """Sweep trials of one experiment log the same dataset at once; the store's insert of the shared
    dataset row can lose that race (UNIQUE constraint, seen with an MLflow server on SQLite). The
    second try links the row the other run created."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from raydpo.tracking import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e"))
    logger = RunLogger(uri, run.info.run_id)
    real, calls = logger.client.log_inputs, []

    def first_call_loses_the_race(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id")
        return real(*args, **kwargs)

    logger.client.log_inputs = first_call_loses_the_race
    logger.log_dataset("builtin:tiny-prefs", "training", {"rows": 64})
    assert len(calls) == 2
    assert [d.dataset.name for d in client.get_run(run.info.run_id).inputs.dataset_inputs] == [
        "builtin:tiny-prefs"
    ]
