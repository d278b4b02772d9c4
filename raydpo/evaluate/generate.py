"""Batched sampling from a trained policy as a Ray Data batch-inference stage.

An actor pool holds the policy (and the reference, for KL); each batch of prompts is sampled at
every requested temperature, `n` times, and each sample carries its summed log-probability under
the policy and the reference, so KL(π‖π_ref) can be estimated from the samples themselves
(metrics.kl_from_samples). Sampling is seeded per batch (seed + index of the batch's first prompt),
so a rerun over the same prompts gives the same completions.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raydpo.models.generation import sample_responses
from raydpo.ops.logprobs import rollout_logps


class PolicySampler:
    """Ray Data actor stage; its settings are class attributes set by `sampler()` (no constructor args)."""

    policy: str = ""  # HF model directory of the policy
    reference: str | None = None  # HF model directory of the reference (None: no log-probs under it)
    temperatures: tuple[float, ...] = (1.0,)  # 0 = greedy
    n: int = 1  # samples per prompt and temperature
    max_new_tokens: int = 24
    seed: int = 0

    def __init__(self):
        self.tok = AutoTokenizer.from_pretrained(self.policy, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(self.policy, trust_remote_code=False).eval()
        self.ref = (
            AutoModelForCausalLM.from_pretrained(self.reference, trust_remote_code=False).eval()
            if self.reference
            else None
        )

    def _logps(self, model, ro) -> torch.Tensor:
        """(B,) summed log-probs of the sampled response tokens under `model` (at temperature 1)."""
        full_ids = torch.cat([ro.query_ids, ro.response_ids], 1)
        full_mask = torch.cat([ro.query_mask, ro.response_mask], 1)
        lp = rollout_logps(model, full_ids, full_mask, ro.query_ids.shape[1])  # (B, Tr)
        return (lp * ro.response_mask).sum(1)

    def __call__(self, batch: dict) -> dict:
        prompts, idx = [str(p) for p in batch["prompt"]], [int(i) for i in batch["idx"]]
        out: dict[str, list] = {k: [] for k in ("idx", "prompt", "temperature", "sample", "completion",
                                                 "logp_policy", "logp_ref")}  # fmt: skip
        for t_i, temp in enumerate(self.temperatures):
            for k in range(self.n):
                seed = self.seed + idx[0] * 1_000 + t_i * 100 + k
                ro = sample_responses(self.model, self.tok, prompts, self.max_new_tokens, temp, seed)
                with torch.no_grad():
                    lp = self._logps(self.model, ro).tolist()
                    lr = (
                        self._logps(self.ref, ro).tolist()
                        if self.ref is not None
                        else [float("nan")] * len(lp)
                    )
                for j, p in enumerate(prompts):
                    row = (idx[j], p, float(temp), k, ro.texts[j], lp[j], lr[j])
                    for key, v in zip(out, row):
                        out[key].append(v)
        return out


def sampler(policy: str | Path, reference: str | Path | None, temperatures, n: int, max_new_tokens: int,
            seed: int) -> type[PolicySampler]:  # fmt: skip
    attrs = {"policy": str(policy), "reference": str(reference) if reference else None,
             "temperatures": tuple(float(t) for t in temperatures), "n": n, "max_new_tokens": max_new_tokens,
             "seed": seed}  # fmt: skip
    return type("PolicySampler", (PolicySampler,), attrs)


def sample_policy(
    policy: str | Path, prompts: list[str], *, reference: str | Path | None = None, temperatures=(1.0,),
    n: int = 1, max_new_tokens: int = 24, seed: int = 0, concurrency: int = 1, batch_size: int = 32,
) -> list[dict]:  # fmt: skip
    """Samples of `policy` for every prompt × temperature × n, in prompt order, via a Ray Data actor pool.

    Rows: idx, prompt, temperature, sample, completion, logp_policy, logp_ref (NaN without a reference).
    """
    ds = ray.data.from_items([{"idx": i, "prompt": p} for i, p in enumerate(prompts)])
    ds = ds.map_batches(
        sampler(policy, reference, temperatures, n, max_new_tokens, seed),
        compute=ray.data.ActorPoolStrategy(size=concurrency), batch_size=batch_size, batch_format="numpy",
    )  # fmt: skip
    rows = ds.take_all()
    return sorted(rows, key=lambda r: (r["temperature"], r["sample"], r["idx"]))
