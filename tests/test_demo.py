"""`raydpo demo --size tiny` end to end, and the tiny sentiment task and baselines it builds.

The demo runs once for the module (about 4 minutes on 2 cores): task, reward model, a 3-trial DPO
sweep, Preferred-FT, PPO, PPO-GT, then the eval of all of them and Best-of-4. The task and baseline
checks below read that run's outputs instead of training everything a second time.
"""

import json
import math

import pytest

from raydpo.demo import envelope_at, format_results, paper_check
from raydpo.evaluate.metrics import Interval

# ----------------------------------------------------------------------------- pure parts


def test_envelope_is_the_concave_hull_flat_after_its_best_point():
    pts = [(0.0, 0.0), (2.0, 1.0), (4.0, 1.2)]
    assert envelope_at(pts, 1.0) == pytest.approx(0.5)  # mixture of SFT and the KL-2 policy
    assert envelope_at(pts, 3.0) == pytest.approx(1.1)
    assert envelope_at(pts, 10.0) == pytest.approx(1.2)  # KL ≤ 10 reaches the best point
    assert envelope_at([(1.0, 0.3)], 0.5) == -math.inf  # nothing at KL ≤ 0.5
    # a dominated middle point does not pull the envelope down
    assert envelope_at([(0.0, 0.0), (1.0, 0.1), (2.0, 1.0)], 1.0) == pytest.approx(0.5)


def _iv(x):
    return Interval(x, x - 0.05, x + 0.05, 100)


def _row(method, loss, beta, reward, kl, win_sft):
    return {"policy": f"{method}{loss}{beta}", "method": method, "loss": loss, "beta": beta,
            "reward": _iv(reward), "kl": _iv(kl), "win_vs_sft": win_sft and _iv(win_sft),
            "win_vs_ppo": None}  # fmt: skip


def test_paper_check_compares_at_matched_kl_and_on_win_rates():
    sft = _row("SFT", None, None, 0.0, 0.0, None)
    dpo = [_row("DPO", "sigmoid", 1.0, 0.4, 1.0, 0.7), _row("DPO", "sigmoid", 0.1, 0.6, 4.0, 0.8)]
    ipo = _row("DPO", "ipo", 0.1, 0.9, 0.5, 0.9)  # not sigmoid: not part of the DPO (sigmoid) frontier
    ppo_below = _row("PPO", None, 0.05, 0.45, 2.0, 0.75)  # envelope at KL 2: 0.4 + 0.2·1/3 = 0.467
    ok, lines = paper_check([sft, *dpo, ipo, ppo_below])
    assert ok and "DPO ≥ PPO" in lines[0] and "0.467" in lines[0]
    ppo_above = _row("PPO", None, 0.05, 0.5, 2.0, 0.75)  # interval [0.45, 0.55] holds 0.467
    ok, lines = paper_check([sft, *dpo, ipo, ppo_above])
    assert not ok and "DPO < PPO, within PPO's 95% interval" in lines[0] and "DPO ≥ PPO" in lines[1]
    ppo_far = _row("PPO", None, 0.05, 0.6, 2.0, 0.75)
    ok, lines = paper_check([sft, *dpo, ppo_far])
    assert not ok and "DPO < PPO, outside PPO's 95% interval" in lines[0]
    ppo_wins = _row("PPO", None, 0.05, 0.1, 2.0, 0.85)  # below the frontier, but a better win rate
    ok, lines = paper_check([sft, *dpo, ppo_wins])
    assert not ok and "DPO ≥ PPO" in lines[0] and "DPO < PPO" in lines[1]


def test_results_table_has_the_issue_columns():
    rows = [_row("SFT", None, None, 0.1, 0.0, None), _row("DPO", "sigmoid", 0.1, 0.4, 3.0, 0.7)]
    table = format_results(rows).splitlines()
    for col in ("method", "loss", "β", "reward", "KL", "win vs SFT", "win vs PPO"):
        assert col in table[0]
    assert "| DPO " in table[3] and "| sigmoid " in table[3] and "0.700 [0.650, 0.750]" in table[3]
    assert len(table) == 4


def test_best_of_n_keeps_the_best_scored_sample_per_slot():
    from raydpo.evaluate.run import best_of_n_kl, best_of_n_rows

    rows = [{"idx": i, "prompt": f"p{i}", "temperature": 1.0, "sample": k, "completion": f"c{i}-{k}"}
            for i in range(2) for k in range(4)]  # fmt: skip
    score = lambda prompts, completions: [float(c[-1]) * (1 if c[1] == "0" else -1) for c in completions]
    best = best_of_n_rows(rows, 2, score)  # slots {0, 1} and {2, 3} per prompt
    got = {(r["idx"], r["sample"]): r["completion"] for r in best}
    assert got == {(0, 0): "c0-1", (0, 1): "c0-3", (1, 0): "c1-0", (1, 1): "c1-2"}
    assert best_of_n_kl(4).estimate == pytest.approx(math.log(4) - 0.75)
    assert best_of_n_kl(4).low == best_of_n_kl(4).high == best_of_n_kl(4).estimate


def test_a_demo_folder_is_reused_only_for_the_same_settings(tmp_path):
    from raydpo.demo import check_settings
    from raydpo.errors import UserError

    root = tmp_path / "demo"
    check_settings(root, {"size": "tiny", "seed": 0})
    check_settings(root, {"size": "tiny", "seed": 0})  # a re-run: reuse
    with pytest.raises(UserError, match="other settings"):
        check_settings(root, {"size": "tiny", "seed": 1})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        check_settings(tmp_path / "other", {"size": "tiny", "seed": 0})


# ----------------------------------------------------------------------------- the demo run


@pytest.fixture(scope="module")
def demo(ray_local, tmp_path_factory):
    from raydpo.demo import run_demo

    lines: list[str] = []
    out = run_demo(size="tiny", root=tmp_path_factory.mktemp("demo"), log=lines.append)
    return out, lines


def _runs(out):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=out["tracking_uri"])
    exp = client.get_experiment_by_name("raydpo-demo")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def _tasks(out):
    return json.loads(open(out["root"] + "/task/task.json").read())


@pytest.mark.ray
@pytest.mark.slow
def test_demo_shows_progress_table_plot_and_the_mlflow_command(demo):
    out, lines = demo
    text = "\n".join(lines)
    for stage in range(1, 7):
        assert f"] {stage}/6 " in text, stage
    assert "| method " in text and "win vs PPO" in text
    assert f"mlflow ui --backend-store-uri sqlite:///{out['root']}/mlflow.db" in text
    assert "Paper's finding" in text
    with open(out["frontier"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert out["table"] in open(out["results_md"]).read()


@pytest.mark.ray
@pytest.mark.slow
def test_demo_results_cover_every_method_with_intervals(demo):
    out, _ = demo
    rows = {r["policy"]: r for r in out["rows"]}
    methods = {"SFT", "Preferred-FT", "Best-of-4", "PPO", "PPO-GT", "DPO"}
    assert {r["method"] for r in rows.values()} == methods
    assert {r["loss"] for r in rows.values() if r["method"] == "DPO"} == {"sigmoid", "ipo", "hinge"}
    assert abs(rows["sft"]["kl"].estimate) < 1e-6  # the SFT policy is the reference
    assert rows["best-of-4"]["kl"].estimate == pytest.approx(math.log(4) - 0.75)
    for name, r in rows.items():
        for key in ("reward", "kl", "win_vs_sft", "win_vs_ppo"):
            iv = r[key]
            if iv is None:
                assert (name, key) in {("sft", "win_vs_sft"), ("ppo", "win_vs_ppo")}, (name, key)
                continue
            assert iv.low <= iv.estimate <= iv.high, (name, key, iv)
    for r in rows.values():
        if r["win_vs_sft"] is not None:
            assert 0 <= r["win_vs_sft"].low and r["win_vs_sft"].high <= 1 and r["win_vs_sft"].n == 64


@pytest.mark.ray
@pytest.mark.slow
def test_demo_mlflow_holds_sweep_baselines_and_eval(demo):
    out, _ = demo
    client, runs = _runs(out)
    kind = lambda k: [r for r in runs if r.data.tags.get("raydpo.kind") == k]
    (sweep,) = kind("sweep")
    trials = [r for r in kind("trial") if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert sorted(r.data.tags["sweep.loss.name"] for r in trials) == ["hinge", "ipo", "sigmoid"]
    # ranked by what the demo measures: each trial's win rate against SFT, the best on the parent
    assert all(0 <= r.data.metrics["winrate/vs_sft"] <= 1 for r in trials)
    best = max(r.data.metrics["winrate/vs_sft"] for r in trials)
    assert sweep.data.metrics["best/winrate/vs_sft"] == best and sweep.data.tags["raydpo.best_trial"]
    assert {r.data.tags.get("method") for r in kind("baseline")} >= {"sft", "reward_model", "preferred_ft",
                                                                      "ppo", "ppo_gt"}  # fmt: skip
    evals = kind("eval")
    (parent,) = [r for r in evals if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["eval.policy"]: r for r in evals if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {r["policy"] for r in out["rows"]}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"frontier.png", "winrates.png"}
    assert children["best-of-4"].data.tags["eval.best_of_n"] == "4"
    assert children["best-of-4"].data.tags["eval.reward_model"].endswith("reward-model/final")
    dpo = children["dpo-sigmoid-b0.1"]
    trial = next(r for r in trials if r.data.tags["sweep.loss.name"] == "sigmoid")
    assert dpo.data.tags["eval.policy_run_id"] == trial.info.run_id  # eval run linked to the run it judged
    for metric in ("winrate/vs_sft", "winrate/vs_sft_ci_low", "winrate/vs_sft_ci_high", "winrate/vs_ppo"):
        (m,) = client.get_metric_history(dpo.info.run_id, metric)
        assert 0 <= m.value <= 1
    (demo_run,) = kind("demo")
    assert {a.path for a in client.list_artifacts(demo_run.info.run_id)} >= {"results.md", "frontier.png"}


@pytest.mark.ray
@pytest.mark.slow
def test_prepare_builds_a_mixed_sentiment_sft_policy(demo):
    manifest = _tasks(demo[0])
    corpus, sft = manifest["corpus_reward"], manifest["sft_reward"]
    assert abs(corpus["mean"]) < 0.15 and corpus["std"] > 0.4
    assert abs(sft["mean"] - corpus["mean"]) < 0.3  # samples read like the corpus: mixed
    assert sft["std"] > 0.3  # with spread
    rows = [json.loads(x) for x in open(manifest["pairs"])]
    assert len(rows) >= 100 and {"prompt", "chosen", "rejected"} <= set(rows[0])
    agree = sum(
        r["chosen_reward"] > r["rejected_reward"] for r in rows if r["chosen_reward"] != r["rejected_reward"]
    )
    assert agree / len(rows) > 0.8  # Bradley–Terry labels mostly follow the ground truth


@pytest.mark.ray
@pytest.mark.slow
def test_reward_model_is_well_above_chance(demo):
    client, runs = _runs(demo[0])
    (rm,) = [r for r in runs if r.data.tags.get("method") == "reward_model"]
    acc = client.get_metric_history(rm.info.run_id, "eval/rewards/accuracies")  # DPO's name for it
    assert acc and acc[-1].value > 0.65, [m.value for m in acc]  # held-out pair accuracy; chance is 0.5
    assert rm.data.tags["raydpo.kind"] == "baseline"


@pytest.mark.ray
@pytest.mark.slow
def test_dpo_raises_the_ground_truth_reward_over_sft(demo):
    rows = {r["policy"]: r for r in demo[0]["rows"]}
    assert rows["dpo-sigmoid-b0.1"]["reward"].estimate > rows["sft"]["reward"].estimate + 0.1
    assert rows["dpo-sigmoid-b0.1"]["win_vs_sft"].estimate > 0.5


@pytest.mark.ray
@pytest.mark.slow
def test_ppo_against_the_reward_model_logs_its_metrics(demo):
    client, runs = _runs(demo[0])
    (ppo,) = [r for r in runs if r.data.tags.get("method") == "ppo"]
    assert "ppo.reward_model" in ppo.data.params
    for k in ("reward/rm_mean", "reward/gt_mean", "kl", "loss/policy", "loss/value", "grad_norm"):
        steps = [m.step for m in client.get_metric_history(ppo.info.run_id, k)]
        assert steps == [2, 4, 6], k  # the engine's logging: every train.log_every (2) steps, once
    assert {a.path for a in client.list_artifacts(ppo.info.run_id)} >= {"config.yaml"}


@pytest.mark.ray
@pytest.mark.slow
def test_preferred_ft_run_is_tracked(demo):
    client, runs = _runs(demo[0])
    (pft,) = [r for r in runs if r.data.tags.get("method") == "preferred_ft"]
    assert pft.data.tags["raydpo.kind"] == "baseline" and pft.data.params["method"] == "preferred_ft"
    assert client.get_metric_history(pft.info.run_id, "perplexity")


@pytest.mark.ray
@pytest.mark.slow
def test_best_of_n_baseline_run(demo):
    """Best-of-4 is evaluated like a policy: its eval run has a reward and the analytic KL."""
    import math

    client, runs = _runs(demo[0])
    (bon,) = [r for r in runs if r.data.tags.get("eval.best_of_n") == "4"]
    assert "reward/gt_mean" in bon.data.metrics and 0 <= bon.data.metrics["winrate/vs_sft"] <= 1
    assert bon.data.metrics["kl"] == pytest.approx(math.log(4) - 3 / 4)


@pytest.mark.ray
@pytest.mark.slow
def test_ppo_gt_raises_reward_and_kl_grows(demo):
    from mlflow.tracking import MlflowClient

    from raydpo.config import build_config
    from raydpo.methods import train as run

    out = demo[0]
    manifest = _tasks(out)
    cfg = build_config({
        "run_name": "ppo-gt-12", "method": "ppo_gt",
        "model": {"policy": manifest["sft_model"]},
        "data": {"source": manifest["prompts"]},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 12, "log_every": 1, "output_dir": out["root"] + "/runs"},
        "ppo": {"reward": "vader", "rollout_batch_size": 32, "minibatch_size": 16, "kl_coef": 0.05},
        "tracking": {"tracking_uri": out["tracking_uri"], "experiment": "raydpo-demo"},
    })  # fmt: skip
    res = run(cfg, log=lambda *_: None, stream=None)
    client = MlflowClient(tracking_uri=out["tracking_uri"])
    gt = [m.value for m in client.get_metric_history(res["mlflow_run_id"], "reward/gt_mean")]
    kl = [m.value for m in client.get_metric_history(res["mlflow_run_id"], "kl")]
    assert len(gt) == len(kl) == 12
    assert sum(gt[-3:]) / 3 > sum(gt[:3]) / 3 + 0.1, gt
    assert sum(kl[-3:]) / 3 > sum(kl[:3]) / 3, kl  # moving away from the reference costs KL
