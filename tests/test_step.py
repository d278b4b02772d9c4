"""The training step and loop: accumulation invariance, seeding, LoRA reference, non-finite guard."""

import pytest
import torch

from raydpo.config import build_config
from raydpo.data.builtin import tiny_prefs
from raydpo.data.schema import PreferenceRecord
from raydpo.data.tokenize import collate, pad_token_id, tokenize_pair
from raydpo.engine.local import train_local
from raydpo.engine.optim import lr_factor
from raydpo.engine.step import split_batch, train_step
from raydpo.methods.dpo import DPO, compute_loss
from raydpo.methods.dpo import objective as dpo_objective
from raydpo.models.loading import load_policy, load_reference, load_tokenizer
from raydpo.ops.logprobs import sequence_logps


def _cfg(model_dir, **train):
    return build_config({
        "model": {"policy": str(model_dir)},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 8, "max_steps": 3, "seed": 0, **train},
    })  # fmt: skip


def _pairs(tok, n=16):
    return [tokenize_pair(PreferenceRecord(**r), tok, 64, 32) for r in tiny_prefs(n=n)]


def test_sequence_logps_match_manual(tiny_llama_dir):
    """sum/mean log-probs equal a plain log_softmax computation on the labelled tokens."""
    cfg = _cfg(tiny_llama_dir)
    tok, model = load_tokenizer(cfg.model), load_policy(cfg.model)
    b = collate(_pairs(tok, 2), pad_token_id(tok))
    out = sequence_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
    logp = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)
    for i in range(4):
        pos = (b["labels"][i] != -100).nonzero().flatten()
        manual = sum(logp[i, t - 1, b["labels"][i, t]] for t in pos)
        assert out.sum[i].item() == pytest.approx(manual.item(), abs=1e-4)
        assert out.n_tokens[i].item() == len(pos)
        assert out.mean[i].item() == pytest.approx(manual.item() / len(pos), abs=1e-5)


def test_batch8_equals_batch4_times_accum2(tiny_llama_dir):
    """Batch 8 in one pass vs 2 micro-batches of 4: same loss and same updated weights (1e-5)."""
    results = []
    for accum in (1, 2):
        cfg = _cfg(tiny_llama_dir, grad_accum_steps=accum, max_steps=1)
        tok = load_tokenizer(cfg.model)
        policy, ref = load_policy(cfg.model), load_reference(cfg.model)
        hist = train_local(cfg, DPO, _pairs(tok), pad_token_id(tok), policy=policy, reference=ref)
        results.append((hist, [p.detach().clone() for p in policy.parameters()]))
    (h1, w1), (h2, w2) = results
    for k in ("loss", "grad_norm", "rewards/margins", "logps/chosen"):
        assert h1[0][k] == pytest.approx(h2[0][k], abs=1e-5), k
    assert max((a - b).abs().max().item() for a, b in zip(w1, w2)) < 1e-5


def test_accumulation_scores_the_reference_once_per_batch(tiny_llama_dir):
    """With 4 micro-batches the reference runs once over the whole batch (DPO's batch_reference), not
    once per micro-batch, and the step's metrics equal one pass of 8 (1e-5)."""
    from raydpo.data.tokenize import collate_batch

    cfg = _cfg(tiny_llama_dir)
    tok, policy, ref = load_tokenizer(cfg.model), load_policy(cfg.model), load_reference(cfg.model)
    calls = []
    ref.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                  with_kwargs=True)  # fmt: skip
    batch = collate_batch(_pairs(tok, 8), pad_token_id(tok), "shared")
    metrics = {}
    for accum in (1, 4):
        calls.clear()
        metrics[accum] = train_step(policy, ref, dict(batch), dpo_objective(cfg), accum)
        policy.zero_grad(set_to_none=True)
        assert calls == [8], (accum, calls)  # one pass over the batch's 8 rows (a row per pair)
    for k in ("loss", "logps/chosen", "rewards/margins"):
        assert metrics[4][k].item() == pytest.approx(metrics[1][k].item(), abs=1e-5), k


def test_same_seed_same_curve_different_seed_differs(tiny_llama_dir):
    curves = {}
    for seed in (0, 0, 1):
        cfg = _cfg(tiny_llama_dir, seed=seed, max_steps=4)
        tok = load_tokenizer(cfg.model)
        hist = train_local(cfg, DPO, _pairs(tok), pad_token_id(tok))
        curves.setdefault(seed, []).append([h["loss"] for h in hist])
    assert curves[0][0] == curves[0][1]
    assert curves[0][0] != curves[1][0]  # another seed shuffles the pairs differently
    assert curves[0][0][-1] < curves[0][0][0]  # and the loss goes down on the builtin pairs


def test_split_batch_keeps_pairs_together():
    from raydpo.data.tokenize import TokenizedPair

    pairs = [TokenizedPair([1], [10 + i], [20 + i]) for i in range(4)]
    b = collate(pairs, pad_id=0)
    second = split_batch(b, 2)[1]
    assert second["input_ids"][:, 1].tolist() == [12, 13, 22, 23]  # chosen of pairs 2,3 then their rejected
    single = split_batch(collate(pairs, pad_id=0, chosen_only=True), 2, paired=False)[1]
    assert single["input_ids"][:, 1].tolist() == [12, 13]
    # precomputed reference log-probs are one value per pair: split by pair, not by row
    ref = {"ref_chosen": torch.arange(4.0), "ref_rejected": torch.arange(4.0, 8.0)}
    second = split_batch({**b, **ref}, 2)[1]
    assert second["ref_chosen"].tolist() == [2.0, 3.0] and second["ref_rejected"].tolist() == [6.0, 7.0]


def test_lora_reference_is_base_model(tiny_llama_dir):
    """With LoRA, no reference copy: adapters off give the reference; at init policy == reference."""
    cfg = build_config({"model": {"policy": str(tiny_llama_dir), "lora": {"r": 4}}})
    tok, policy = load_tokenizer(cfg.model), load_policy(cfg.model)
    assert load_reference(cfg.model) is None
    b = collate(_pairs(tok, 4), pad_token_id(tok))
    metrics = train_step(policy, None, b, dpo_objective(cfg))
    assert metrics["loss"].item() == pytest.approx(0.693147, abs=1e-5)  # LoRA B starts at zero
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)


def test_sft_weight_adds_chosen_nll(tiny_llama_dir):
    base = _cfg(tiny_llama_dir)
    tok, policy, ref = load_tokenizer(base.model), load_policy(base.model), load_reference(base.model)
    b = collate(_pairs(tok, 4), pad_token_id(tok))
    plain, m = compute_loss(policy, ref, b, base.loss)
    with_sft, _ = compute_loss(policy, ref, b, base.loss.model_copy(update={"sft_weight": 0.5}))
    nll = -sequence_logps(policy, b["input_ids"], b["attention_mask"], b["labels"]).mean[:4].mean()
    assert with_sft.item() == pytest.approx(plain.item() + 0.5 * nll.item(), abs=1e-5)


def test_warmup_then_schedules():
    from raydpo.config import OptimConfig

    c = OptimConfig(warmup_steps=3, schedule="linear")
    assert [round(lr_factor(s, c, 7), 3) for s in range(8)] == [0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(5, OptimConfig(schedule="cosine"), 10) == pytest.approx(0.5)
    assert lr_factor(100, OptimConfig(), 10) == 1.0


def test_non_finite_loss_stops_before_update(tiny_llama_dir):
    """A real step whose loss is NaN (here: a NaN policy weight) stops the run before any update."""
    cfg = _cfg(tiny_llama_dir, max_steps=1)
    tok, policy, ref = load_tokenizer(cfg.model), load_policy(cfg.model), load_reference(cfg.model)
    with torch.no_grad():
        policy.lm_head.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 1"):
        train_local(cfg, DPO, _pairs(tok), pad_token_id(tok), policy=policy, reference=ref)
    after = list(policy.parameters())
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, after))


def _score(cfg, pairs):
    from raydpo.engine.reference import ScoreReference

    scorer = ScoreReference(cfg.model_dump(mode="json"))
    cols = ([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs])
    return scorer, scorer.score(*cols)  # the columns of a Ray Data batch, as an actor gets them


def test_reference_scorer_uses_the_runs_layout_and_keeps_the_rows_order(tiny_llama_dir, monkeypatch):
    """`engine.reference.ScoreReference` scores in the run's layout (one row per pair with
    `train.prefix_sharing`, else two) in micro-batches of SCORE_MICRO pairs sorted by width, and hands
    the values back in the rows' order: each equals the pair scored alone, full logits (1e-5)."""
    from raydpo.data.tokenize import collate_batch
    from raydpo.engine import reference as ref_module
    from raydpo.engine.sources import row_width
    from raydpo.ops.logprobs import pair_logps

    cfg = _cfg(tiny_llama_dir)
    tok, model = load_tokenizer(cfg.model), load_reference(cfg.model)
    pairs = _pairs(tok, 12)
    alone = []
    for p in pairs:
        with torch.no_grad():
            alone.append(pair_logps(model, collate([p], pad_token_id(tok))).sum.tolist())  # chosen, rejected
    calls = []

    def recording(group, pad_id, layout, groups=1):
        calls.append((layout, [row_width(p, layout) for p in group]))
        return collate_batch(group, pad_id, layout, groups)

    monkeypatch.setattr(ref_module, "collate_batch", recording)
    monkeypatch.setattr(ref_module, "SCORE_MICRO", 5)
    for sharing, layout in ((True, "shared"), (False, "pairs")):
        calls.clear()
        scorer, (chosen, rejected) = _score(_cfg(tiny_llama_dir, prefix_sharing=sharing), pairs)
        assert scorer.layout == layout
        assert [len(w) for _, w in calls] == [5, 5, 2] and {c for c, _ in calls} == {layout}
        widths = [w for _, ws in calls for w in ws]
        assert widths == sorted(widths) and len(set(widths)) > 1  # sorted across the micro-batches
        for i, (c, r) in enumerate(alone):
            assert chosen[i] == pytest.approx(c, abs=1e-5) and rejected[i] == pytest.approx(r, abs=1e-5), i


def test_precomputed_reference_trains_like_the_live_one(tiny_llama_dir, monkeypatch):
    """`train_local(reference_logps=...)`: the batches carry the scorer's values (moved with their pairs
    into width-sorted micro-batches), no reference model is loaded, and every step's metrics equal a run
    with the live reference (1e-5)."""
    import raydpo.engine.loop as loop

    cfg = _cfg(tiny_llama_dir, prefix_sharing=True, grad_accum_steps=4, max_steps=2)
    tok = load_tokenizer(cfg.model)
    pairs = _pairs(tok)
    live = train_local(cfg, DPO, pairs, pad_token_id(tok))
    scorer, (chosen, rejected) = _score(cfg, pairs)
    values = scorer.columns(pairs)  # the driver's batches of BATCH: here one
    assert values["ref_chosen"].tolist() == pytest.approx(chosen.tolist(), abs=1e-6)
    assert values["ref_rejected"].tolist() == pytest.approx(rejected.tolist(), abs=1e-6)

    def no_reference(*a, **k):
        raise AssertionError("a reference model was loaded although the batches carry its values")

    monkeypatch.setattr(loop, "load_reference", no_reference)
    pre = train_local(cfg, DPO, pairs, pad_token_id(tok), reference_logps=values)
    assert len(pre) == len(live) == 2
    for a, b in zip(live, pre):
        for k in ("loss", "grad_norm", "logps/chosen", "rewards/margins", "rewards/chosen"):
            assert b[k] == pytest.approx(a[k], abs=1e-5), k
    with pytest.raises(ValueError, match="ref_chosen"):
        short = {**values, "ref_chosen": values["ref_chosen"][:3]}
        train_local(cfg, DPO, pairs, pad_token_id(tok), reference_logps=short)


def test_under_bf16_the_precomputed_reference_is_scored_as_the_live_one(tiny_llama_dir):
    """`scaling.precision=bf16` (autocast, here on the CPU): the scorer runs under the training step's
    autocast, so a precomputed reference trains like the live one (step 1's loss at ln 2 in both; a
    float32 reference beside the bf16 policy moved it by 6e-6, step 2's by 1.1e-4). The cache key tells
    the bf16 scoring apart; a CPU run's float32 key does not change with `precision` auto or fp32."""
    import math

    from raydpo.engine.reference import cache_key

    cfg = _cfg(tiny_llama_dir, prefix_sharing=True, grad_accum_steps=4, max_steps=2)
    bf16 = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"precision": "bf16"})})
    tok = load_tokenizer(bf16.model)
    pairs = _pairs(tok)
    live = train_local(bf16, DPO, pairs, pad_token_id(tok))
    scorer, _ = _score(bf16, pairs)
    assert scorer.bf16 and scorer.device.type == "cpu"
    pre = train_local(bf16, DPO, pairs, pad_token_id(tok), reference_logps=scorer.columns(pairs))
    assert live[0]["loss"] == pytest.approx(math.log(2), abs=1e-7) == pre[0]["loss"]
    for a, b in zip(live, pre):
        for k in ("loss", "grad_norm", "logps/chosen", "rewards/margins"):
            assert b[k] == pytest.approx(a[k], abs=1e-6), k
    fp32 = _score(cfg, pairs)[0].columns(pairs)["ref_chosen"]
    assert not torch.allclose(fp32, scorer.columns(pairs)["ref_chosen"], atol=1e-4)  # bf16 did change them
    fp32_cfg = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"precision": "fp32"})})
    assert cache_key(cfg) == cache_key(fp32_cfg) != cache_key(bf16)
