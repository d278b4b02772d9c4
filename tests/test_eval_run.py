"""`raydpo eval`: two policies on the same prompts, judged by VADER, tracked in MLflow."""

import json
import subprocess
import sys

import pytest
import yaml

PROMPTS = ["the movie was", "i thought the acting", "the plot of this film", "the music"] * 4


def _write(tmp_path, **over):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cfg = {
        "name": "ev",
        "prompts": str(prompts),
        "output_dir": str(tmp_path / "out"),
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment": "ev"},
        **over,
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.ray
def test_eval_logs_win_rates_frontier_and_samples(ray_local, tmp_path, tiny_llama_dir):
    from mlflow.tracking import MlflowClient

    from raydpo.evaluate.run import run_eval
    from raydpo.models.tiny import save_tiny

    other = save_tiny(tmp_path / "other", seed=1)
    path = _write(
        tmp_path,
        reference=str(tiny_llama_dir),
        policies={"a": str(tiny_llama_dir), "b": str(other)},
        baselines=["b"],
        temperatures=[0.7, 1.0],
        max_new_tokens=8,
    )
    out = run_eval(str(path), log=lambda *_: None)
    a07 = out["results"]["a"][0.7]
    wr = a07["winrate/vs_b"]
    assert 0 <= wr.low <= wr.estimate <= wr.high <= 1 and wr.n == len(PROMPTS)
    assert abs(a07["kl"].estimate) < 1e-4  # policy a is the reference
    assert "winrate/vs_b" not in out["results"]["b"][0.7]  # a baseline is not compared with itself
    assert "win vs b" in out["table"] and "a" in out["table"]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ev").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["eval.policy"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parent) == 1 and set(children) == {"a", "b"}
    assert all(r.data.tags["raydpo.kind"] == "eval" for r in runs)
    hist = client.get_metric_history(children["a"].info.run_id, "winrate/vs_b")
    by_step = {m.step: m.value for m in hist}  # step = round(100 × temperature)
    assert by_step[70] == pytest.approx(wr.estimate)
    assert by_step[100] == pytest.approx(out["results"]["a"][1.0]["winrate/vs_b"].estimate)
    for k in ("winrate/vs_b_ci_low", "winrate/vs_b_ci_high", "reward/mean", "kl_ci_high"):
        assert client.get_metric_history(children["a"].info.run_id, k), k
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"frontier.png", "winrates.png", "results.txt"} <= arts
    assert "samples.json" in {a.path for a in client.list_artifacts(children["a"].info.run_id)}


def test_eval_bad_inputs_fail_before_generation(tmp_path, tiny_llama_dir):
    path = _write(
        tmp_path, reference=str(tiny_llama_dir), policies={"a": str(tiny_llama_dir)}, baselines=["sft"]
    )
    r = subprocess.run([sys.executable, "-m", "raydpo", "eval", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "baseline 'sft' is not one of the policies" in r.stderr
    path = _write(
        tmp_path,
        reference=str(tiny_llama_dir),
        policies={"a": str(tiny_llama_dir)},
        judge={"kind": "llm", "endpoint": "http://127.0.0.1:9/v1", "model": "judge"},
    )
    r = subprocess.run([sys.executable, "-m", "raydpo", "eval", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "not reachable" in r.stderr and "Traceback" not in r.stderr


def test_eval_config_best_of_n_and_series_are_checked(tmp_path, tiny_llama_dir):
    from raydpo.errors import ConfigError
    from raydpo.evaluate.run import BestOfNPolicy, load_eval_config

    ok = _write(
        tmp_path,
        reference=str(tiny_llama_dir),
        policies={"a": str(tiny_llama_dir), "bon": {"best_of_n": 4, "policy": "x", "reward_model": "y"}},
        series={"a": "A"},
    )
    cfg = load_eval_config(ok)
    assert isinstance(cfg.policies["bon"], BestOfNPolicy) and cfg.policies["bon"].best_of_n == 4
    with pytest.raises(ConfigError, match="series: 'b' is not one of the policies"):
        load_eval_config(_write(tmp_path, reference="r", policies={"a": "p"}, series={"b": "B"}))
    with pytest.raises(ConfigError, match="best_of_n"):
        load_eval_config(_write(tmp_path, reference="r", policies={"a": {"best_of_n": 1, "policy": "p",
                                                                          "reward_model": "m"}}))  # fmt: skip
