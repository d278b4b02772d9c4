"""The built-in sentiment task at tiny size and the baselines on it (one shared Ray, one task).

The task is prepared once per module (SFT policy trained by raydpo's SFT trainer on Ray Train);
each baseline is then a Ray Train job logged to MLflow like a DPO run.
"""

import json

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def task(ray_local, tmp_path_factory):
    from raydpo.tasks.prepare import prepare

    root = tmp_path_factory.mktemp("sentiment")
    tracking = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "task"}
    manifest = prepare(root, size="tiny", seed=0, tracking=tracking, log=lambda *_: None)
    return manifest, tracking


def _cfg(task, method, run_name, **over):
    from conftest import deep_update

    from raydpo.config import build_config

    manifest, tracking = task
    base = {
        "run_name": run_name,
        "method": method,
        "model": {"policy": manifest["sft_model"]},
        "data": {"source": manifest["pairs"], "max_length": 48, "max_prompt_length": 16},
        "train": {"batch_size": 16, "output_dir": manifest["root"] + "/runs", "log_every": 4},
        "tracking": tracking,
    }
    return build_config(deep_update(base, over))


def mean_gt_reward(model_dir, prompts_file, seed=1):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydpo.generation import generate
    from raydpo.tasks.sentiment import SentimentReward

    prompts = [json.loads(x)["prompt"] for x in open(prompts_file)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    texts = [c for cs in generate(model, tok, prompts, n=4, max_new_tokens=24, seed=seed) for c in cs]
    scores = SentimentReward()(texts)
    return sum(scores) / len(scores)


def test_prepare_builds_a_mixed_sentiment_sft_policy(task):
    manifest, _ = task
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


def test_reward_model_is_well_above_chance(task):
    from mlflow.tracking import MlflowClient

    from raydpo.train.launch import run

    cfg = _cfg(
        task,
        "reward_model",
        "rm",
        data={"eval_fraction": 0.2},
        optim={"lr": 1e-3, "max_grad_norm": None},
        train={"epochs": 8, "eval_every": 9},
    )
    out = run(cfg, log=lambda *_: None)
    client = MlflowClient(tracking_uri=task[1]["tracking_uri"])
    acc = client.get_metric_history(out["mlflow_run_id"], "eval/accuracy")
    assert acc[-1].value > 0.65, [m.value for m in acc]  # held-out pair accuracy; chance is 0.5
    run_ = client.get_run(out["mlflow_run_id"])
    assert run_.data.tags["raydpo.kind"] == "baseline" and run_.data.tags["method"] == "reward_model"
    task[0]["reward_model"] = out["final_model"]


def test_dpo_on_task_pairs_raises_ground_truth_reward(task):
    from raydpo.train.launch import run

    manifest, _ = task
    out = run(
        _cfg(task, "dpo", "dpo", optim={"lr": 1e-3}, loss={"beta": 0.1}, train={"epochs": 3}),
        log=lambda *_: None,
    )
    sft, dpo = (
        mean_gt_reward(manifest["sft_model"], manifest["eval_prompts"]),
        mean_gt_reward(out["final_model"], manifest["eval_prompts"]),
    )
    assert dpo > sft + 0.1, (sft, dpo)


def test_ppo_gt_raises_reward_and_kl_grows(task):
    from mlflow.tracking import MlflowClient

    from raydpo.train.launch import run

    manifest, tracking = task
    cfg = _cfg(
        task,
        "ppo_gt",
        "ppo_gt",
        data={"source": manifest["prompts"]},
        optim={"lr": 1e-3},
        train={"max_steps": 12},
        ppo={"reward": "vader", "rollout_batch_size": 32, "minibatch_size": 16, "kl_coef": 0.05},
    )
    out = run(cfg, log=lambda *_: None)
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    gt = [m.value for m in client.get_metric_history(out["mlflow_run_id"], "reward/gt_mean")]
    kl = [m.value for m in client.get_metric_history(out["mlflow_run_id"], "kl")]
    assert len(gt) == len(kl) == 12
    assert sum(gt[-3:]) / 3 > sum(gt[:3]) / 3 + 0.1, gt
    assert sum(kl[-3:]) / 3 > sum(kl[:3]) / 3, kl  # moving away from the reference costs KL
    sft, ppo = (
        mean_gt_reward(manifest["sft_model"], manifest["eval_prompts"]),
        mean_gt_reward(out["final_model"], manifest["eval_prompts"]),
    )
    assert ppo > sft + 0.1, (sft, ppo)


def test_ppo_against_reward_model_and_best_of_n(task):
    from mlflow.tracking import MlflowClient

    from raydpo.baselines.best_of_n import run_best_of_n
    from raydpo.config import TrackingConfig
    from raydpo.train.launch import run

    manifest, tracking = task
    if "reward_model" not in manifest:
        pytest.skip("needs the reward model test's output")
    cfg = _cfg(
        task,
        "ppo",
        "ppo_rm",
        data={"source": manifest["prompts"]},
        optim={"lr": 1e-3},
        train={"max_steps": 4},
        ppo={
            "reward_model": manifest["reward_model"],
            "reward": "vader",
            "rollout_batch_size": 16,
            "minibatch_size": 8,
        },
    )
    out = run(cfg, log=lambda *_: None)
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    r = client.get_run(out["mlflow_run_id"])
    assert r.data.tags["method"] == "ppo" and "ppo.reward_model" in r.data.params
    for k in ("reward/mean", "reward/gt_mean", "kl", "loss/policy", "loss/value"):
        assert len(client.get_metric_history(r.info.run_id, k)) == 4, k
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out["final_model"])

    prompts = [json.loads(x)["prompt"] for x in open(manifest["eval_prompts"])][:32]
    bon = run_best_of_n(
        manifest["sft_model"],
        manifest["reward_model"],
        prompts,
        n=4,
        tracking=TrackingConfig(**tracking),
        run_dir=manifest["root"] + "/runs/best_of_n",
    )
    assert len(bon["responses"]) == 32 and client.get_run(bon["mlflow_run_id"]).data.metrics["reward/gt_mean"]


def test_preferred_ft_run_is_tracked(task):
    from mlflow.tracking import MlflowClient

    from raydpo.train.launch import run

    out = run(_cfg(task, "preferred_ft", "pft", train={"max_steps": 4, "log_every": 2}), log=lambda *_: None)
    client = MlflowClient(tracking_uri=task[1]["tracking_uri"])
    r = client.get_run(out["mlflow_run_id"])
    assert r.data.tags["raydpo.kind"] == "baseline" and r.data.params["method"] == "preferred_ft"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "perplexity")] == [2, 4]
