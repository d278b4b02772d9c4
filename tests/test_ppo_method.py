"""PPO as a method of the one engine: temperature-consistent log-probs, resume, logging once."""

import json

import pytest
import torch

from raydpo.config import build_config
from raydpo.engine.local import train_local
from raydpo.methods.ppo import PPO_GT, PPORollout, load_model, objective
from raydpo.models.loading import load_reference, load_tokenizer
from raydpo.ops.logprobs import left_padded_positions

PROMPTS = ["the film was", "i thought the plot", "this movie", "the actors were", "what a", "overall it"]


def _cfg(model_dir, tmp_path, **ppo):
    return build_config({
        "run_name": "ppo", "method": "ppo_gt",
        "model": {"policy": str(model_dir)},
        "optim": {"lr": 1e-3},
        "train": {"max_steps": 4, "checkpoint_every": 2, "seed": 0, "output_dir": str(tmp_path / "runs")},
        "ppo": {"rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 5,
                "reward": "vader", **ppo},
        "tracking": {"enabled": False},
    })  # fmt: skip


def test_rollout_logprobs_are_at_the_sampling_temperature(tiny_llama_dir, tmp_path):
    """At ppo.temperature = 0.5 the rollout's old log-probs are log softmax(logits / 0.5) of the sampled
    tokens (not the temperature-1 values), the first update's ratio π/π_old is exactly 1, and the KL
    to a reference equal to the policy is 0."""
    cfg = _cfg(tiny_llama_dir, tmp_path, temperature=0.5)
    torch.manual_seed(0)
    policy, reference = load_model(cfg, None), load_reference(cfg.model)
    rollout = PPORollout(cfg, policy, reference, torch.device("cpu"), 0, 1)
    minibatches, metrics = rollout(PROMPTS[:4], step=1)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)

    mb = minibatches[0]
    tq, ids, mask = mb["query_len"], mb["full_ids"], mb["full_mask"]
    with torch.no_grad():
        logits = policy.lm(
            input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask)
        ).logits
    targets = ids[:, tq:].unsqueeze(-1)
    at_t = torch.log_softmax(logits[:, tq - 1 : -1] / 0.5, -1).gather(2, targets).squeeze(-1)
    at_1 = torch.log_softmax(logits[:, tq - 1 : -1], -1).gather(2, targets).squeeze(-1)
    real = mb["mask"].bool()
    assert torch.allclose(mb["old_lp"][real], at_t[real], atol=1e-5)
    assert not torch.allclose(mb["old_lp"][real], at_1[real], atol=1e-3)

    _, stats = objective(cfg)(policy, None, mb)
    assert stats["ratio_mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx(0.0, abs=1e-10)


def test_ppo_with_lora_takes_the_base_model_as_its_reference(tiny_llama_dir, tmp_path):
    """With model.lora (no model.reference) no reference is loaded: the rollout scores the reference
    log-probs with the policy's adapters off. The adapters start at zero, so step 1's KL is 0; after
    updates the adapters are on again for the policy (KL moves) and off for the reference."""
    cfg = build_config({**_cfg(tiny_llama_dir, tmp_path).model_dump(mode="json"),
                        "model": {"policy": str(tiny_llama_dir), "lora": {"r": 4}}})  # fmt: skip
    assert load_reference(cfg.model) is None
    tok = load_tokenizer(cfg.model)
    hist = train_local(cfg, PPO_GT, PROMPTS, tok.eos_token_id)
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert any(abs(h["kl"]) > 1e-4 for h in hist[1:])


def test_resumed_ppo_continues_kl_coefficient_and_value_head(tiny_llama_dir, tmp_path):
    """Adaptive KL: a run resumed from its step-2 checkpoint reproduces steps 3-4 of the uninterrupted
    run, KL coefficient and value loss included (both come from the checkpoint)."""
    cfg = _cfg(tiny_llama_dir, tmp_path, kl_target=0.5, kl_horizon=10, kl_coef=0.2)
    tok = load_tokenizer(cfg.model)
    full = train_local(cfg, PPO_GT, PROMPTS, tok.eos_token_id, checkpoint_dir=tmp_path / "ckpt")
    assert [h["step"] for h in full] == [1, 2, 3, 4]
    assert full[1]["kl_coef"] != full[0]["kl_coef"]  # the controller moves: resuming it matters
    ckpt = tmp_path / "ckpt" / "checkpoint_000002"
    assert (ckpt / "model" / "value_head.safetensors").is_file()
    resumed = train_local(cfg, PPO_GT, PROMPTS, tok.eos_token_id, resume_from=ckpt)
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for k in ("kl_coef", "loss", "loss/value", "loss/policy", "kl", "reward/gt_mean"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), k


@pytest.mark.ray
@pytest.mark.slow
def test_ppo_worker_failure_resumes_and_logs_each_step_once(ray_local, run_cfg, tmp_path, inject_fault):
    """A Ray Train worker dies after step 3: Ray restarts it from the step-2 checkpoint; MLflow holds
    every step exactly once and the run ends as the uninterrupted one does."""
    from mlflow.tracking import MlflowClient

    from raydpo.methods import train

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    over = dict(method="ppo", data={"source": str(prompts)}, scaling={"num_workers": 1, "max_failures": 1},
                train={"max_steps": 4, "checkpoint_every": 2},
                ppo={"rollout_batch_size": 4, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 5,
                     "kl_target": 0.5, "kl_horizon": 10, "kl_coef": 0.2, "reward": "vader"})  # fmt: skip
    over["method"] = "ppo_gt"
    clean = train(run_cfg(run_name="clean", tracking={"enabled": False}, **over), log=lambda *_: None)
    inject_fault(3, tmp_path / "fired")
    cfg = run_cfg(run_name="faulty", **over)
    out = train(cfg, log=lambda *_: None)
    assert (tmp_path / "fired").exists()
    assert [h["step"] for h in out["history"]] == [1, 2, 3, 4]
    for a, b in zip(clean["history"], out["history"]):
        for k in ("kl_coef", "loss", "loss/value"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), (a["step"], k)
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FINISHED"
    for k in ("loss", "kl_coef", "reward/gt_mean"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, k)) == [1, 2, 3, 4], k
    assert (tmp_path / "runs" / "faulty" / "config.yaml").is_file()
    assert "grad_norm" in run.data.metrics and "ppo.kl_target" in run.data.params
