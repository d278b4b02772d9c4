"""Sweeps: validation before any trial, a 2 × 2 sweep on Ray Tune with nested MLflow runs, a failed
trial resumed."""

import subprocess
import sys

import pytest
import yaml

from raydpo.errors import ConfigError
from raydpo.sweep import SearchDim, load_sweep


def write(tmp_path, sweep: dict, base: dict | None = None):
    base_path = tmp_path / "base.yaml"
    base_path.write_text(yaml.safe_dump(base or {"model": {"policy": "builtin:tiny-llama"}}))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": "base.yaml", **sweep}))
    return path


GOOD = {"search": {"loss.name": {"grid": ["sigmoid", "hinge"]}, "loss.beta": {"grid": [0.1, 0.5]}}}


def test_valid_sweep_loads_with_overrides(tmp_path):
    sweep, base = load_sweep(write(tmp_path, GOOD), ["num_samples=2", "train.max_steps=3"])
    assert sweep.num_samples == 2 and base["train"]["max_steps"] == 3
    assert sweep.search["loss.beta"].kind == "grid"


@pytest.mark.parametrize(
    "sweep,needle",
    [
        ({**GOOD, "serch": {}}, "unknown key 'serch'"),
        ({"search": {"loss.name": {"grid": ["sigmoid", "dpo"]}}}, "search.loss.name='dpo'"),
        ({"search": {"loss.bta": {"grid": [0.1]}}}, "unknown key 'loss.bta'"),
        ({"search": {"loss.beta": {"grid": [0.1], "choice": [1]}}}, "exactly one of"),
        ({"search": {"loss.beta": {"uniform": [-1.0, 1.0]}}}, "loss.beta"),
        ({**GOOD, "metric": "accuracy"}, "metric 'accuracy' is not reported"),
        ({**GOOD, "metric": "eval/loss"}, "needs an eval split"),
        ({**GOOD, "scheduler": {"type": "hyperband"}}, "scheduler.type"),
        ({**GOOD, "seeds": 0}, "seeds"),
        ({"search": {"train.seed": {"grid": [0, 1]}}, "seeds": 2}, "train.seed is already in search"),
    ],
)
def test_bad_sweep_files_fail_before_any_trial(tmp_path, sweep, needle):
    with pytest.raises(ConfigError) as e:
        load_sweep(write(tmp_path, sweep))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_seeds_cross_the_space_with_train_seed(tmp_path):
    """`seeds: 3` on a base with train.seed 5: every point of the space with seeds 5, 6, 7 (12 trials)."""
    from raydpo.sweep.run import _count_trials

    base = {"model": {"policy": "builtin:tiny-llama"}, "train": {"seed": 5}}
    sweep, _ = load_sweep(write(tmp_path, {**GOOD, "seeds": 3}, base))
    assert sweep.search["train.seed"].grid == [5, 6, 7] and _count_trials(sweep) == 12


def test_seed_rows_give_each_point_its_mean_and_t_interval_over_seeds():
    """Two points of the space, three seeds each (one trial failed): (0.6, 0.7, 0.8) → 0.7 ± 4.303 ·
    0.1 / √3 = 0.7 ± 0.2484; (0.5, 0.5) → 0.5 ± 0 over 2 seeds."""
    from raydpo.sweep.report import seed_rows

    rows = [
        {"loss.beta": 0.1, "train.seed": s, "m": v, "status": "OK"} for s, v in enumerate((0.6, 0.7, 0.8))
    ]
    rows += [{"loss.beta": 1.0, "train.seed": s, "m": 0.5, "status": "OK"} for s in range(2)]
    rows += [{"loss.beta": 1.0, "train.seed": 2, "m": 0.0, "status": "ERROR"}]
    got = {r["loss.beta"]: r for r in seed_rows(rows, ["loss.beta", "train.seed"], "m")}
    assert got[0.1]["m mean"] == pytest.approx(0.7) and got[0.1]["seeds"] == 3
    assert got[0.1]["ci_high"] - 0.7 == pytest.approx(4.303 * 0.1 / 3**0.5, abs=1e-6)
    assert (got[1.0]["m mean"], got[1.0]["ci_low"], got[1.0]["seeds"]) == (0.5, 0.5, 2)


def test_unknown_loss_in_search_exits_2_from_cli(tmp_path):
    path = write(tmp_path, {"search": {"loss.name": {"grid": ["sigmoid", "sigmoidd"]}}})
    r = subprocess.run([sys.executable, "-m", "raydpo", "sweep", str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown loss 'sigmoidd'" in r.stderr


def test_search_dim_probe_values():
    assert SearchDim(randint=(2, 5)).probe_values() == [2, 4]
    assert SearchDim(loguniform=(1e-5, 1e-3)).probe_values() == [1e-5, 1e-3]


BASE = {
    "data": {
        "source": "builtin:tiny-prefs",
        "max_length": 48,
        "max_prompt_length": 24,
        "eval_fraction": 0.25,
    },
    "optim": {"lr": 1e-3},
    "train": {"batch_size": 4, "max_steps": 4, "eval_every": 2, "checkpoint_every": 2},
}


@pytest.mark.ray
@pytest.mark.slow
def test_two_trial_sweep_in_the_default_store_resumes_its_failed_trial(
    ray_local, tmp_path, tiny_llama_dir, monkeypatch, inject_fault
):
    """2 losses × 1 β (two swept keys) with no tracking settings and a relative output_dir, run from a
    temporary working directory, both at once (the demo's sweep covers the third loss; the crossing
    of grids is counted in the tests above). One trial dies after step 3 (its checkpoint is at step
    2): the sweep reports it failed, refuses to run again without --resume, and the resumed sweep
    finishes it from its checkpoint without running the finished trial again or logging a step twice.
    One reference pass serves every trial, the resumed one included (the cache). Each trial's run
    lies in ./mlflow.db under the parent (Tune runs trials in folders of their own) with a readable
    name, and every artifact lies inside the working directory."""
    from mlflow.tracking import MlflowClient

    from raydpo.sweep import run_sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = {"loss.name": {"grid": ["sigmoid", "ipo"]}, "loss.beta": {"grid": [0.25]}}
    sweep = {"search": space, "metric": "eval/rewards/margins", "mode": "max", "max_concurrent_trials": 2}
    train = {**BASE["train"], "output_dir": "runs", "precompute_reference": True}  # one reference pass
    path = str(write(tmp_path, sweep, {**BASE, "model": {"policy": str(tiny_llama_dir)}, "train": train}))
    inject_fault(3, tmp_path / "fired")
    lines: list[str] = []
    first = run_sweep(path, log=lines.append)
    assert first["failed"] == 1 and (tmp_path / "fired").exists()
    (computed,) = [x for x in lines if x.startswith("reference log-probs: computed")]
    assert "(in this process)" in computed  # `train.reference_workers: auto`: tiny work, no actor
    assert not [x for x in lines if x.startswith("reference log-probs: reused")]  # the trials had it
    ended = [x for x in lines if " finished: " in x or " FAILED: " in x]  # one line per trial as it ends
    assert len(ended) == 2 and ended[-1].startswith("trial 2/2 ")
    assert len([x for x in ended if " FAILED: " in x]) == 1
    finished = [x for x in ended if " finished: " in x]
    assert all("loss.name=" in x and "loss.beta=" in x and "eval/rewards/margins" in x for x in finished)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("raydpo")
    done = {r.info.run_id: r.info.end_time for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("raydpo.kind") == "trial" and r.info.status == "FINISHED"}  # fmt: skip
    assert len(done) == 1
    with pytest.raises(Exception, match="pass --resume"):
        run_sweep(path, log=lambda *_: None)

    more: list[str] = []
    out = run_sweep(path, resume=True, log=more.append)
    assert out["failed"] == 0 and len(out["rows"]) == 2
    assert not [x for x in more if x.startswith("reference log-probs: computed")]  # read from the cache
    margins = [r["eval/rewards/margins"] for r in out["rows"]]
    assert margins == sorted(margins, reverse=True)  # sorted by the metric, best first
    assert any(x.startswith("best trial ") for x in more)
    assert any("mlflow ui --backend-store-uri" in x for x in lines + more)
    assert any("/#/experiments/" in x and x.endswith("/runs") for x in more)

    assert exp.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("raydpo.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("raydpo.kind") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    combos = {(c.data.tags["sweep.loss.name"], c.data.tags["sweep.loss.beta"]) for c in children}
    assert combos == {(n, "0.25") for n in ("sigmoid", "ipo")}
    names = {f"b0.25-{n}" for n in ("sigmoid", "ipo")}
    assert {c.info.run_name for c in children} == names  # named by their swept values
    for c in children:
        assert c.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(c.info.run_id, "loss")] == [1, 2, 3, 4]
        assert c.data.params["loss.name"] == c.data.tags["sweep.loss.name"]
        if c.info.run_id in done:
            assert c.info.end_time == done[c.info.run_id]  # a finished trial did not run again
    for r in runs:
        assert r.info.artifact_uri.startswith(tmp_path.as_uri()), r.info.artifact_uri
        assert client.list_artifacts(r.info.run_id)
    assert not list(tmp_path.parent.glob("mlartifacts")) and (tmp_path / "runs" / "s" / "trials").is_dir()
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "summary")}
    assert {"summary/trials.csv", "summary/metric_vs_beta.png", "summary/trials.json"} <= arts
    assert parents[0].data.metrics["best/eval/rewards/margins"] == pytest.approx(margins[0])


@pytest.mark.parametrize(
    "path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("sweeps/*.yaml"))
)
def test_shipped_sweep_files_validate(path):
    sweep, base = load_sweep(path)
    assert sweep.search and sweep.metric


@pytest.mark.ray
def test_impossible_resources_fail_before_any_trial(ray_local, tmp_path):
    from raydpo.errors import UserError
    from raydpo.sweep import check_resources

    sweep, base = load_sweep(write(tmp_path, {**GOOD, "trial": {"num_workers": 2, "use_gpu": True}}))
    with pytest.raises(UserError, match="each trial needs 2 GPU"):
        check_resources(sweep, base)
    sweep, base = load_sweep(write(tmp_path, {**GOOD, "trial": {"num_workers": 64}}))
    with pytest.raises(UserError, match="each trial needs 64 CPU"):
        check_resources(sweep, base)


def test_metric_names_come_from_the_base_configs_method(tmp_path):
    """A reward-model sweep may rank by the reward model's own metrics; DPO's names are not offered."""
    base = {"method": "reward_model", "model": {"policy": "builtin:tiny-llama"},
            "data": {"eval_fraction": 0.2}, "train": {"eval_every": 2}}  # fmt: skip
    sweep, _ = load_sweep(write(tmp_path, {**GOOD, "metric": "eval/rewards/accuracies", "mode": "max"}, base))
    assert sweep.metric == "eval/rewards/accuracies"
    with pytest.raises(ConfigError, match="not reported by method sft"):
        load_sweep(write(tmp_path, {**GOOD, "metric": "rewards/margins"}, {**base, "method": "sft"}))


def test_on_policy_methods_do_not_offer_a_token_rate():
    from raydpo.methods import METHODS

    assert "tokens_per_second" in METHODS["dpo"].reported
    assert "tokens_per_second" not in METHODS["ppo"].reported and "kl" in METHODS["ppo"].reported
