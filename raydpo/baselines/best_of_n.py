"""Best-of-N: sample N responses from a policy (the SFT model), keep the one a reward model scores
highest (the DPO paper's Best-of-N baseline, §6). Nothing is trained; the selection is the "policy".
"""

from __future__ import annotations

from pathlib import Path

import torch


def score_with_reward_model(rm, tokenizer, prompts: list[str], responses: list[str]) -> list[float]:
    """Reward-model scores of prompt + response texts (right-padded, read at the last token)."""
    from raydpo.data.tokenize import pad_token_id
    from raydpo.train.objectives import reward_scores

    rows = [tokenizer(p + r, add_special_tokens=True)["input_ids"] for p, r in zip(prompts, responses)]
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(rows):
        ids[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1
    with torch.no_grad():
        return reward_scores(rm, ids, mask).tolist()


def best_of_n(policy_dir: str | Path, reward_model_dir: str | Path, prompts: list[str], n: int = 4,
              seed: int = 0, max_new_tokens: int = 24, temperature: float = 1.0) -> list[str]:  # fmt: skip
    """For each prompt, the highest-scoring of `n` samples."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from raydpo.generation import generate

    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    samples = generate(
        policy, tok, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
    )
    best = []
    for p, cands in zip(prompts, samples):
        scores = score_with_reward_model(rm, tok, [p] * len(cands), cands)
        best.append(cands[max(range(len(cands)), key=scores.__getitem__)])
    return best


def run_best_of_n(policy_dir, reward_model_dir, prompts: list[str], n: int, tracking, run_dir: Path,
                  reward: str | None = "vader", seed: int = 0) -> dict:  # fmt: skip
    """Best-of-N as a baseline run in MLflow (`raydpo.kind=baseline`, `method=best_of_n`)."""
    from raydpo.rewards import get_reward
    from raydpo.tracking import KIND_TAG, RunLogger, find_or_create_run, tracking_uri

    chosen = best_of_n(policy_dir, reward_model_dir, prompts, n=n, seed=seed)
    out = {"n": n, "responses": chosen}
    if reward:
        scores = get_reward(reward)(chosen)
        out["reward/gt_mean"] = sum(scores) / len(scores)
    if tracking.enabled:
        tags = {KIND_TAG: "baseline", "method": "best_of_n"}
        params = {"n": n, "policy": str(policy_dir), "reward_model": str(reward_model_dir), "seed": seed}
        run_id = find_or_create_run(tracking, run_dir, "best_of_n", tags, params)
        logger = RunLogger(tracking_uri(tracking), run_id)
        if "reward/gt_mean" in out:
            logger.log_metrics({"reward/gt_mean": out["reward/gt_mean"]}, step=0)
        logger.finish()
        out["mlflow_run_id"] = run_id
    return out
