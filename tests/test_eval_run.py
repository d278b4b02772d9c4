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
def test_eval_logs_win_rates_frontier_and_samples(ray_local, run_cfg, tmp_path, tiny_llama_dir):
    from mlflow.tracking import MlflowClient

    from raydpo.evaluate.run import run_eval
    from raydpo.methods import train
    from raydpo.models.tiny import save_tiny

    other = save_tiny(tmp_path / "other", seed=1)
    # a raydpo DPO run (tracked in experiment "t" of the same store) whose final/ is evaluated
    trained = train(run_cfg(run_name="dpo", scaling={"num_workers": 1}, train={"max_steps": 2, "seed": 3},
                            loss={"beta": 0.25}), log=lambda *_: None)  # fmt: skip
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = _write(
        tmp_path,
        reference=str(tiny_llama_dir),
        policies={"a": str(tiny_llama_dir), "b": str(other), "dpo": str(tmp_path / "runs" / "dpo")},
        baselines=["b"],
        temperatures=[0.7, 1.0],
        max_new_tokens=8,
        workers=2,  # the Ray Data pass (`auto` would sample an eval this small in process)
        tracking={"tracking_uri": uri, "experiment": "ev"},
    )
    lines: list[str] = []
    out = run_eval(str(path), log=lines.append)
    assert any("in one Ray Data pass (2 actor(s))" in x for x in lines), lines
    a07 = out["results"]["a"][0.7]
    wr = a07["winrate/vs_b"]
    assert 0 <= wr.low <= wr.estimate <= wr.high <= 1 and wr.n == len(PROMPTS)
    assert abs(a07["kl"].estimate) < 1e-4  # policy a is the reference
    assert "winrate/vs_b" not in out["results"]["b"][0.7]  # a baseline is not compared with itself
    assert "win vs b" in out["table"] and "a" in out["table"]

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ev").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["eval.policy"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(parent) == 1 and set(children) == {"a", "b", "dpo"}
    assert all(r.data.tags["raydpo.kind"] == "eval" for r in runs)
    hist = client.get_metric_history(children["a"].info.run_id, "winrate/vs_b")
    by_step = {m.step: m.value for m in hist}  # step = round(100 × temperature)
    assert by_step[70] == pytest.approx(wr.estimate)
    assert by_step[100] == pytest.approx(out["results"]["a"][1.0]["winrate/vs_b"].estimate)
    for k in ("winrate/vs_b_ci_low", "winrate/vs_b_ci_high", "reward/gt_mean", "kl_ci_high"):
        assert client.get_metric_history(children["a"].info.run_id, k), k
    # the eval run of a trained policy names its method, loss, β, lr and seed, and its source run
    dpo = client.get_run(children["dpo"].info.run_id).data
    assert dpo.params["source_run_id"] == trained["mlflow_run_id"] == dpo.tags["eval.policy_run_id"]
    named = [dpo.params[k] for k in ("method", "loss.name", "loss.beta", "optim.lr", "train.seed")]
    assert named == ["dpo", "sigmoid", "0.25", "0.001", "3"]
    assert dpo.tags["eval.method"] == "dpo" and dpo.tags["mlflow.runName"] == "ev/dpo"
    assert children["a"].data.params["method"] == "unknown"  # a bare model directory, no run
    assert "source_run_id" not in children["a"].data.params
    # the parent: best win rate per baseline and temperature step, the policy count, a description
    best = {m.step: m.value for m in client.get_metric_history(parent[0].info.run_id, "best/winrate/vs_b")}
    wins = [out["results"][n][0.7]["winrate/vs_b"].estimate for n in ("a", "dpo")]
    assert best[70] == pytest.approx(max(wins))
    assert {m.value for m in client.get_metric_history(parent[0].info.run_id, "policies")} == {3}
    assert out["table"] in parent[0].data.tags["mlflow.note.content"]
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"frontier.png", "winrates.png", "results.txt"} <= arts
    assert "samples.json" in {a.path for a in client.list_artifacts(children["a"].info.run_id)}


def test_source_params_name_the_policy():
    from raydpo.evaluate.run import BestOfNPolicy, source_params

    ppo = {"method": "ppo", "optim.lr": "1e-05", "train.seed": "0", "ppo.kl_coef": "0.05",
           "ppo.kl_target": "None", "ppo.reward_model": "rm", "model.policy": "sft"}  # fmt: skip
    assert source_params("runs/ppo", "r1", ppo) == {
        "method": "ppo", "optim.lr": "1e-05", "train.seed": "0", "ppo.kl_coef": "0.05",
        "ppo.kl_target": "None", "source_run_id": "r1",
    }  # fmt: skip
    assert source_params("some/model", None, {}) == {"method": "unknown"}
    bon = BestOfNPolicy(best_of_n=4, policy="sft", reward_model="rm")
    assert source_params(bon, None, {}) == {"method": "best_of_n", "best_of_n": "4"}
    assert source_params(bon, "r2", ppo)["source_run_id"] == "r2"  # the run of the policy it samples


def test_best_winrates_and_winrate_plot(tmp_path):
    from raydpo.evaluate.metrics import Interval
    from raydpo.evaluate.report import plot_winrates
    from raydpo.evaluate.run import best_winrates

    def iv(x):
        return Interval(x, x - 0.1, x + 0.1, 16)

    results = {
        "sft": {0.7: {"kl": iv(0), "winrate/vs_ppo": iv(0.3)}, 1.0: {"kl": iv(0), "winrate/vs_ppo": iv(0.4)}},
        "ppo": {0.7: {"kl": iv(1), "winrate/vs_sft": iv(0.7)}, 1.0: {"kl": iv(1), "winrate/vs_sft": iv(0.6)}},
        "dpo": {0.7: {"kl": iv(0.5), "winrate/vs_sft": iv(0.8), "winrate/vs_ppo": iv(0.55)},
                1.0: {"kl": iv(0.5), "winrate/vs_sft": iv(0.5), "winrate/vs_ppo": iv(0.45)}},
    }  # fmt: skip
    best = best_winrates(results, ["sft", "ppo"])
    assert best[0.7]["policies"] == 3 and best[0.7]["best/winrate/vs_sft"] == 0.8
    assert best[1.0]["best/winrate/vs_sft"] == 0.6  # ppo's, at this temperature
    assert best[1.0]["best/winrate/vs_ppo_ci_high"] == pytest.approx(0.55)  # dpo's interval
    assert plot_winrates(results, ["sft", "ppo"], tmp_path / "w.png") == tmp_path / "w.png"
    assert (tmp_path / "w.png").stat().st_size > 0
    assert plot_winrates({"a": {1.0: {"kl": iv(0.0)}}}, ["a"], tmp_path / "x.png") is None


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
