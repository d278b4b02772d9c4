"""Sampling a policy as a Ray Data batch-inference stage (shared local Ray)."""

import math

import pytest

pytestmark = [pytest.mark.ray]

PROMPTS = [
    "the movie was",
    "i thought the acting",
    "the plot of this film",
    "frankly, the ending",
    "the music",
]


def test_samples_every_prompt_temperature_and_repeat_deterministically(ray_local, tiny_llama_dir):
    from raydpo.evaluate.generate import sample_policy
    from raydpo.evaluate.metrics import kl_from_samples

    kw = dict(reference=tiny_llama_dir, temperatures=(0.0, 1.0), n=2, max_new_tokens=8, seed=3, batch_size=2)
    rows = sample_policy(tiny_llama_dir, PROMPTS, **kw)
    assert len(rows) == len(PROMPTS) * 2 * 2
    assert {(r["idx"], r["temperature"], r["sample"]) for r in rows} == {
        (i, t, k) for i in range(5) for t in (0.0, 1.0) for k in range(2)
    }
    assert all(r["prompt"] == PROMPTS[r["idx"]] for r in rows)
    assert sample_policy(tiny_llama_dir, PROMPTS, **kw) == rows  # seeded: the same samples again
    greedy = {(r["idx"], r["completion"]) for r in rows if r["temperature"] == 0.0}
    assert len(greedy) == len(PROMPTS)  # greedy repeats agree per prompt
    sampled = [r["completion"] for r in rows if r["temperature"] == 1.0]
    assert len(set(sampled)) > len(PROMPTS)  # temperature 1 varies
    # The reference is the policy itself here: every sample's log-ratio is 0, so the KL estimate is 0.
    assert all(math.isfinite(r["logp_policy"]) and r["logp_policy"] <= 0 for r in rows)
    kl = kl_from_samples([r["logp_policy"] for r in rows], [r["logp_ref"] for r in rows])
    assert abs(kl.estimate) < 1e-4


def test_kl_to_another_reference_is_positive_on_average(ray_local, tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from raydpo.evaluate.generate import SampleJob, sample_local
    from raydpo.evaluate.metrics import kl_from_samples
    from raydpo.models.tiny import save_tiny

    other = save_tiny(tmp_path / "other", seed=1)  # same tokenizer, other random weights...
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # ...and a peaked next-token distribution, far from the policy's
    model.save_pretrained(other)
    # in process (`sample_local`): the same samples as an actor's (the test below), without starting one
    job = SampleJob(str(tiny_llama_dir), 1, 0)
    rows = sample_local(job, PROMPTS * 8, reference=str(other), max_new_tokens=8)
    kl = kl_from_samples([r["logp_policy"] for r in rows], [r["logp_ref"] for r in rows])
    assert kl.estimate > 0 and kl.low > 0  # KL(π‖π_ref) ≥ 0, clearly so for unrelated models


def test_one_pass_for_several_policies_gives_what_each_gets_alone_and_in_process(ray_local, tiny_llama_dir,
                                                                                  tmp_path):  # fmt: skip
    """`sample_policies` (one Ray Data pass over every policy's chunks) gives each policy the samples
    `sample_local` draws in this process, at temperature 1 alone, with chunks of 2 prompts: a sample's
    seed depends on (seed, chunk, temperature, repeat) only. This is what lets a checkpoint evaluated
    along training be sampled exactly as `raydpo eval` samples the final model. `sample_in_process`
    (a small eval's `workers: auto`) gives every policy exactly the pass's rows."""
    from raydpo.evaluate.generate import SampleJob, sample_in_process, sample_local, sample_policies
    from raydpo.models.tiny import save_tiny

    other = str(save_tiny(tmp_path / "other", seed=1))
    jobs = {"a": SampleJob(str(tiny_llama_dir), 2, 7), "b": SampleJob(other, 1, 7)}
    both = sample_policies(jobs, PROMPTS, reference=tiny_llama_dir, temperatures=(0.0, 1.0), max_new_tokens=6,
                           chunk=2)  # fmt: skip
    alone = sample_local(jobs["a"], PROMPTS, reference=str(tiny_llama_dir), temperatures=(1.0,),
                         max_new_tokens=6, chunk=2)  # fmt: skip
    at_1 = [r for r in both["a"] if r["temperature"] == 1.0]
    assert [r["completion"] for r in alone] == [r["completion"] for r in at_1] and len(alone) == 10
    assert all(abs(x["logp_policy"] - y["logp_policy"]) < 1e-5 for x, y in zip(alone, at_1))
    assert len(both["b"]) == 10 and [r["completion"] for r in both["b"]] != [
        r["completion"] for r in both["a"][:10]
    ]
    here = sample_in_process(jobs, PROMPTS, reference=tiny_llama_dir, temperatures=(0.0, 1.0),
                             max_new_tokens=6, chunk=2)  # fmt: skip
    assert here == both


def test_workers_auto_samples_a_small_eval_in_process_and_a_large_one_on_at_most_the_cores(
    ray_local, tiny_llama_dir, monkeypatch
):
    """`workers: auto`: weight bytes × generated tokens up to SMALL_SAMPLING → 0 (this process); above
    it, one actor per chunk and free CPU, at most this machine's cores on the suite's one-node Ray (it
    counts 4 CPUs on 2 cores). A number is taken as given."""
    import os

    from raydpo.evaluate import run
    from raydpo.evaluate.generate import SampleJob, sampling_work
    from raydpo.models.paths import weight_bytes

    model = str(tiny_llama_dir)
    cfg = run.EvalConfig(prompts="p.jsonl", reference=model, policies={"a": model}, temperatures=[0.0, 1.0],
                         max_new_tokens=8)  # fmt: skip
    jobs = {f"{i}": SampleJob(str(tiny_llama_dir), 2, 0) for i in range(3)}
    work = sampling_work(jobs, 100, tiny_llama_dir, cfg.temperatures, cfg.max_new_tokens)
    assert weight_bytes(tiny_llama_dir) > 0 and work == 3 * 2 * weight_bytes(tiny_llama_dir) * 100 * 2 * 2 * 8
    assert run.sampling_actors(cfg, jobs, 100, tiny_llama_dir) == 0  # a tiny model: well under 1e11
    monkeypatch.setattr(run, "SMALL_SAMPLING", work)
    assert run.sampling_actors(cfg, jobs, 100, tiny_llama_dir) == 0  # up to SMALL_SAMPLING included
    monkeypatch.setattr(run, "SMALL_SAMPLING", work - 1)
    free = int(ray_local.available_resources().get("CPU", 1))
    assert run.sampling_actors(cfg, jobs, 100, tiny_llama_dir) == min(3 * 4, free, os.cpu_count())
    monkeypatch.setattr(run, "SMALL_SAMPLING", 0)
    assert run.sampling_actors(cfg, {"0": jobs["0"]}, 10, tiny_llama_dir) == 1  # one chunk: one actor
    assert run.sampling_actors(cfg.model_copy(update={"workers": 3}), jobs, 100, tiny_llama_dir) == 3
    with pytest.raises(ValueError, match="workers"):
        run.EvalConfig(**{**cfg.model_dump(), "workers": -1})
