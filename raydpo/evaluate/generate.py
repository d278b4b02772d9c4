"""Sampling policies for evaluation: one Ray Data batch-inference pass for every policy, or in process.

The prompts are cut into chunks of `chunk` consecutive prompts. Each chunk is sampled at every
requested temperature, `n` times, and each sample carries its summed log-probability under the
policy and the reference, so KL(π‖π_ref) can be estimated from the samples themselves
(metrics.kl_from_samples). Repeat k at temperature t of the chunk starting at prompt i is seeded by
(seed, i, t, k) alone (`chunk_seed`), not by which other temperatures or policies are sampled with
it, and whoever runs it: `sample_policies` (a Ray Data actor pool over the chunks of every policy,
one pass, so the actors start once), `sample_in_process` (every policy in this process, for an eval
too small to repay starting actors: `sampling_work`) and `sample_local` (one policy in this process,
for checkpoints evaluated along training) give the same completions.
"""

from __future__ import annotations

import json
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raydpo.models.generation import sample_responses
from raydpo.models.paths import weight_bytes
from raydpo.ops.logprobs import rollout_logps

COLUMNS = ("idx", "prompt", "temperature", "sample", "completion", "logp_policy", "logp_ref")
CHUNK = 32  # prompts per chunk (and per `generate` call)


class SampleJob(NamedTuple):
    """One policy to sample: its model directory, samples per prompt and temperature, and seed."""

    policy: str  # HF model directory
    n: int = 1  # samples per prompt and temperature
    seed: int = 0  # sampling seed
    tokenizer: str | None = None  # tokenizer directory; None = the policy's (a checkpoint's model/ has none)


def chunk_seed(seed: int, start: int, temperature: float, k: int) -> int:
    """The generator seed of repeat k at `temperature` of the chunk whose first prompt is `start`."""
    return zlib.crc32(f"{seed}/{start}/{float(temperature)!r}/{k}".encode())


def load_causal_lm(path: str):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False).eval()


def _logps(model, ro) -> torch.Tensor:
    """(B,) summed log-probs of the sampled response tokens under `model` (at temperature 1)."""
    full_ids = torch.cat([ro.query_ids, ro.response_ids], 1)
    full_mask = torch.cat([ro.query_mask, ro.response_mask], 1)
    lp = rollout_logps(model, full_ids, full_mask, ro.query_ids.shape[1])  # (B, Tr)
    return (lp * ro.response_mask).sum(1)


@torch.no_grad()
def sample_chunk(model, tok, ref, prompts: list[str], start: int, temperatures, n: int, max_new_tokens: int,
                 seed: int) -> dict[str, list]:  # fmt: skip
    """Columns (COLUMNS) of every sample of the prompts start, start + 1, ... (one chunk)."""
    out: dict[str, list] = {k: [] for k in COLUMNS}
    for temp in temperatures:
        for k in range(n):
            ro = sample_responses(model, tok, prompts, max_new_tokens, temp, chunk_seed(seed, start, temp, k))
            lp = _logps(model, ro).tolist()
            lr = _logps(ref, ro).tolist() if ref is not None else [float("nan")] * len(lp)
            for j, p in enumerate(prompts):
                row = (start + j, p, float(temp), k, ro.texts[j], lp[j], lr[j])
                for key, v in zip(COLUMNS, row):
                    out[key].append(v)
    return out


def _chunks(jobs: dict[str, SampleJob], prompts: list[str], chunk: int) -> list[dict]:
    return [{"key": key, "policy": job.policy, "tokenizer": job.tokenizer or job.policy, "n": job.n,
             "seed": job.seed, "start": s, "prompts": json.dumps(prompts[s : s + chunk])}
            for key, job in jobs.items() for s in range(0, len(prompts), chunk)]  # fmt: skip


class PolicySampler:
    """Ray Data actor stage over chunks; settings are class attributes set by `sampler()` (no
    constructor args). Holds the reference and the last policy it loaded (chunks arrive policy by policy)."""

    reference: str | None = None  # HF model directory of the reference (None: no log-probs under it)
    temperatures: tuple[float, ...] = (1.0,)  # 0 = greedy
    max_new_tokens: int = 24

    def __init__(self):
        self.ref = load_causal_lm(self.reference) if self.reference else None
        self.loaded: tuple[str, object, object] | None = None

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {k: [] for k in ("key", *COLUMNS)}
        for i in range(len(batch["key"])):
            policy, tok_dir = str(batch["policy"][i]), str(batch["tokenizer"][i])
            if self.loaded is None or self.loaded[0] != policy:
                tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
                self.loaded = (policy, load_causal_lm(policy), tok)
            _, model, tok = self.loaded
            prompts, start = json.loads(str(batch["prompts"][i])), int(batch["start"][i])
            rows = sample_chunk(model, tok, self.ref, prompts, start, self.temperatures, int(batch["n"][i]),
                                self.max_new_tokens, int(batch["seed"][i]))  # fmt: skip
            out["key"] += [str(batch["key"][i])] * len(rows["idx"])
            for k in COLUMNS:
                out[k] += rows[k]
        return out


def sampler(reference: str | Path | None, temperatures, max_new_tokens: int) -> type[PolicySampler]:
    attrs = {"reference": str(reference) if reference else None, "max_new_tokens": max_new_tokens,
             "temperatures": tuple(float(t) for t in temperatures)}  # fmt: skip
    return type("PolicySampler", (PolicySampler,), attrs)


def _ordered(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["temperature"], r["sample"], r["idx"]))


def sample_policies(jobs: dict[str, SampleJob], prompts: list[str], *, reference: str | Path | None = None,
                    temperatures=(1.0,), max_new_tokens: int = 24, chunk: int = CHUNK,
                    concurrency: int = 1) -> dict[str, list[dict]]:  # fmt: skip
    """Samples of every job's policy for every prompt × temperature × n, in one Ray Data pass over
    the chunks of all of them (an actor pool of `concurrency` actors). Returns, per job key, its rows
    sorted by (temperature, sample, idx): idx, prompt, temperature, sample, completion, logp_policy,
    logp_ref (NaN without a reference)."""
    ds = ray.data.from_items(_chunks(jobs, prompts, chunk))
    ds = ds.map_batches(sampler(reference, temperatures, max_new_tokens), batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=concurrency))  # fmt: skip
    out: dict[str, list[dict]] = {key: [] for key in jobs}
    for r in ds.take_all():
        key = r.pop("key")
        out[key].append({k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()})
    return {key: _ordered(rows) for key, rows in out.items()}


def sample_policy(policy: str | Path, prompts: list[str], *, reference: str | Path | None = None,
                  temperatures=(1.0,), n: int = 1, max_new_tokens: int = 24, seed: int = 0,
                  batch_size: int = CHUNK) -> list[dict]:  # fmt: skip
    """`sample_policies` for one policy."""
    job = {"policy": SampleJob(str(policy), n, seed)}
    return sample_policies(job, prompts, reference=reference, temperatures=temperatures,
                           max_new_tokens=max_new_tokens, chunk=batch_size)["policy"]  # fmt: skip


def sample_in_process(jobs: dict[str, SampleJob], prompts: list[str], *, reference: str | Path | None = None,
                      temperatures=(1.0,), max_new_tokens: int = 24,
                      chunk: int = CHUNK) -> dict[str, list[dict]]:  # fmt: skip
    """What `sample_policies` returns, computed in this process job by job (no Ray; the reference is
    loaded once)."""
    ref = load_causal_lm(str(reference)) if reference else None
    return {key: sample_local(job, prompts, reference=ref, temperatures=temperatures,
                              max_new_tokens=max_new_tokens, chunk=chunk)
            for key, job in jobs.items()}  # fmt: skip


def sampling_work(jobs: dict[str, SampleJob], n_prompts: int, reference: str | Path | None, temperatures,
                  max_new_tokens: int) -> float:  # fmt: skip
    """A size for the sampling of `jobs`: per job, the bytes of its policy's weights (and the
    reference's, which scores every sample) times the tokens it generates (prompts × temperatures ×
    n × max_new_tokens). Weight bytes × tokens is proportional to the forward passes' work."""
    ref = weight_bytes(reference) if reference else 0
    return float(sum((weight_bytes(job.policy) + ref) * n_prompts * len(temperatures) * job.n * max_new_tokens
                     for job in jobs.values()))  # fmt: skip


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sample_local(job: SampleJob, prompts: list[str], *, reference=None, temperatures=(1.0,),
                 max_new_tokens: int = 24, chunk: int = CHUNK) -> list[dict]:  # fmt: skip
    """The same samples as `sample_policies`, computed in this process (no Ray). `reference` is a
    model directory or an already loaded model (reused across calls), or None.

    Runs on one torch thread, as a Ray Data actor of one CPU does: the same arithmetic, so the same
    samples; and on a machine busy with other work, several threads each waiting for a core were
    20× slower here (2 cores, load 27: 280 s against 13.5 s for 384 samples)."""
    model = load_causal_lm(job.policy)
    tok = AutoTokenizer.from_pretrained(job.tokenizer or job.policy, trust_remote_code=False)
    ref = load_causal_lm(str(reference)) if isinstance(reference, (str, Path)) else reference
    with torch_threads(1):
        return _sample_chunks(model, tok, ref, job, prompts, temperatures, max_new_tokens, chunk)


def _sample_chunks(
    model, tok, ref, job: SampleJob, prompts, temperatures, max_new_tokens, chunk
) -> list[dict]:
    rows: list[dict] = []
    for s in range(0, len(prompts), chunk):
        cols = sample_chunk(
            model, tok, ref, prompts[s : s + chunk], s, temperatures, job.n, max_new_tokens, job.seed
        )
        rows += [dict(zip(COLUMNS, vals)) for vals in zip(*(cols[k] for k in COLUMNS))]
    return _ordered(rows)
