"""Compute savers give `sequence_logps`'s numbers: prefix sharing (`collate_shared` +
`shared_prefix_logps`), packing several pairs per row (`collate_shared(pack=True)`) and
response-only logits (`response_only_logps`), on tiny random-init models in float32, values and
gradients to 1e-5."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, MistralConfig, Qwen3Config

from raydpo.data.tokenize import IGNORE_INDEX, TokenizedPair, collate, collate_shared, pack_rows
from raydpo.engine.step import split_batch
from raydpo.models.tiny import build_model, build_tokenizer
from raydpo.ops.logprobs import (
    response_only_logps,
    sequence_logps,
    shared_prefix_logps,
    supports_shared_prefix,
)

TOL = {"atol": 1e-5, "rtol": 0.0}
# (prompt, chosen, rejected) lengths: every length differs somewhere, so both layouts pad
SHAPES = [(7, 3, 5), (2, 6, 1), (5, 1, 4), (9, 4, 4)]
STYLE = {"llama": "llama", "gpt2": "gpt2", "qwen2": "qwen", "mistral": "llama", "qwen3": "qwen"}
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip


@pytest.fixture(scope="module")
def toks():
    return {s: build_tokenizer(s) for s in ("llama", "gpt2", "qwen")}


def make_model(toks, family: str, attn: str = "sdpa", **config):
    tok = toks[STYLE[family]]
    if family in ("llama", "gpt2", "qwen2"):
        model = build_model(tok, arch=family)
    else:
        cls = {"mistral": MistralConfig, "qwen3": Qwen3Config}[family]
        torch.manual_seed(0)
        ids = dict(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        model = AutoModelForCausalLM.from_config(cls(vocab_size=len(tok), **SMALL, **ids, **config))
    model.set_attn_implementation(attn)
    return model.eval()  # GPT-2 has dropout


def make_pairs(vocab: int, shapes=SHAPES, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in shapes]


def two_rows(model, pairs, fn=sequence_logps, **kw):
    b = collate(pairs, pad_id=0)
    out = fn(model, b["input_ids"], b["attention_mask"], b["labels"], **kw)
    n = len(pairs)
    return [type(out)(*(x[s] for x in out)) for s in (slice(0, n), slice(n, 2 * n))]


def assert_same(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.sum, w.sum, **TOL)
        torch.testing.assert_close(g.mean, w.mean, **TOL)
        assert g.n_tokens.tolist() == w.n_tokens.tolist()


def some_params(model) -> list[torch.nn.Parameter]:
    """First, middle and last two trainable parameters (embeddings, a block, final norm / head)."""
    ps = [p for p in model.parameters() if p.requires_grad]
    return [ps[0], ps[len(ps) // 2], ps[-2], ps[-1]]


def grads(model, loss):
    return torch.autograd.grad(loss, some_params(model))


# --- layout --------------------------------------------------------------------------------------


def test_collate_shared_layout():
    """One pair [1 2 3 | 4 5 | 6 7 8] and a shorter one [9 | 10 | 11 12], padded with 0."""
    pairs = [TokenizedPair([1, 2, 3], [4, 5], [6, 7, 8]), TokenizedPair([9], [10], [11, 12])]
    b = collate_shared(pairs, pad_id=0)
    I = IGNORE_INDEX  # noqa: E741
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1] * 8, [1] * 4 + [0] * 4]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 1, 2, 0, 0, 0, 0]]
    assert b["chosen_labels"].tolist() == [[I, I, I, 4, 5, I, I, I], [I, 10, I, I, I, I, I, I]]
    assert b["rejected_labels"].tolist() == [[I, I, I, I, I, 6, 7, 8], [I, I, 11, 12, I, I, I, I]]
    # the logits predicting a rejected token: the prompt's last position first, then its own tokens
    assert b["chosen_src"].tolist() == [[2, 3, 0], [0, 0, 0]]
    assert b["rejected_src"].tolist() == [[2, 5, 6], [0, 2, 0]]
    assert b["chosen_tgt"].tolist() == [[4, 5, 0], [10, 0, 0]]
    assert b["rejected_tgt"].tolist() == [[6, 7, 8], [11, 12, 0]]
    assert b["chosen_mask"].tolist() == [[True, True, False], [True, False, False]]
    assert b["rejected_mask"].tolist() == [[True, True, True], [True, True, False]]
    m = b["attention_mask_4d"].int()
    assert m.shape == (2, 1, 8, 8)
    assert m[0, 0].tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],  # prompt: causal
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # chosen: prompt + itself, causal
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # rejected: prompt + itself, never chosen
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ]
    assert m[1, 0].tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0],  # padding: only itself, and no real token sees it
        [0, 0, 0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],
    ]
    with pytest.raises(ValueError, match="non-empty prompt"):
        collate_shared([TokenizedPair([], [1], [2])], pad_id=0)


def test_shared_layout_saves_40_percent_with_prompts_4x_responses():
    """Real tokens computed: collate's 2 rows hold 2p + c + r, the shared row p + c + r."""
    shapes = [(40, 10, 10), (32, 6, 10), (48, 12, 12), (20, 5, 5), (64, 20, 12)]  # c + r = 2p / 4
    pairs = make_pairs(500, shapes)
    two = collate(pairs, pad_id=0)["attention_mask"].sum().item()
    shared = collate_shared(pairs, pad_id=0)["attention_mask"].sum().item()
    assert two == sum(2 * p + c + r for p, c, r in shapes) == 510
    assert shared == sum(p + c + r for p, c, r in shapes) == 306
    assert 1 - shared / two == pytest.approx(0.4, abs=0.005)


# --- prefix sharing ------------------------------------------------------------------------------


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mistral", "qwen3"])
def test_shared_prefix_equals_two_rows(toks, family, attn, pack):
    """One row per pair, or packed rows (PACKED_SHAPES: 5 pairs in 3 rows), give two separate rows'
    log-probs. Negative control: under a causal mask over each whole row the rejected tokens see the
    chosen ones (packed, a pair also sees the pairs before it in its row), and the log-probs move."""
    model = make_model(toks, family, attn)
    assert supports_shared_prefix(model)
    pairs = make_pairs(model.config.vocab_size, PACKED_SHAPES if pack else SHAPES)
    batch = collate_shared(pairs, pad_id=0, pack=pack)
    assert batch["input_ids"].shape == ((3, 17) if pack else (4, 17))
    with torch.no_grad():
        want = two_rows(model, pairs)
        assert_same(shared_prefix_logps(model, batch), want)
        assert_same(shared_prefix_logps(model, batch, response_only=True, chunk=5), want)
        real = batch["attention_mask"].bool()
        causal = torch.ones(real.shape[1], real.shape[1], dtype=torch.bool).tril()
        leak = real[:, None, :, None] & real[:, None, None, :] & causal
        chosen, rejected = shared_prefix_logps(
            model, dict(batch, attention_mask_4d=batch["attention_mask_4d"] | leak)
        )
    assert (rejected.sum - want[1].sum).abs().max() > 1e-3
    if pack:
        assert (chosen.sum - want[0].sum).abs().max() > 1e-3
    else:  # a chosen token sees nothing it should not: the leak adds nothing before it
        torch.testing.assert_close(chosen.sum, want[0].sum, **TOL)


@pytest.mark.parametrize("response_only", [False, True])
def test_shared_prefix_gradients_equal_two_rows(toks, response_only):
    model = make_model(toks, "llama", "sdpa")
    pairs = make_pairs(model.config.vocab_size)
    want_c, want_r = two_rows(model, pairs)
    got_c, got_r = shared_prefix_logps(model, collate_shared(pairs, pad_id=0), response_only, chunk=4)
    want = grads(model, want_c.sum.sum() - 0.5 * want_r.mean.sum())
    got = grads(model, got_c.sum.sum() - 0.5 * got_r.mean.sum())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_unsupported_models_say_so(toks):
    """A family not verified (BLOOM builds ALiBi from a 2-D mask) and a backend without 4-D masks."""
    tok = toks["llama"]
    torch.manual_seed(0)
    bloom = AutoModelForCausalLM.from_config(
        BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=1, n_head=2)
    )
    llama = make_model(toks, "llama")
    llama.config._attn_implementation = "flash_attention_2"  # the check only reads the setting
    batch = collate_shared(make_pairs(len(tok)), pad_id=0)
    for model, why in ((bloom, "bloom"), (llama, "flash_attention_2")):
        assert not supports_shared_prefix(model)
        with pytest.raises(NotImplementedError, match=why):
            shared_prefix_logps(model, batch)


def test_sliding_window_longer_than_the_sequence_is_refused(toks):
    """Mistral's window is not part of the 4-D mask: refuse rows longer than it (9 + 4 > 8)."""
    model = make_model(toks, "mistral", sliding_window=8)
    with pytest.raises(NotImplementedError, match="sliding window"):
        shared_prefix_logps(model, collate_shared(make_pairs(model.config.vocab_size), pad_id=0))


# --- packing -------------------------------------------------------------------------------------
# totals p + c + r: 17, 6, 6, 10, 5 → rows of at most 17 tokens: [17], [10, 6], [6, 5]
PACKED_SHAPES = [(9, 4, 4), (2, 3, 1), (3, 1, 2), (5, 2, 3), (1, 2, 2)]


def test_pack_rows_is_first_fit_decreasing_within_groups():
    assert pack_rows([17, 6, 6, 10, 5], 17) == [[0], [1, 3], [2, 4]]
    assert pack_rows([4, 4, 4, 4], 8, groups=2) == [[0, 1], [2, 3]]  # never a row across groups
    assert pack_rows([3, 9, 2], 5) == [[1], [0, 2]]  # an item over the capacity gets its own row
    with pytest.raises(ValueError, match="3 items do not split into 2"):
        pack_rows([1, 2, 3], 8, groups=2)


def test_packed_layout():
    """[1 2 | 3 | 4] (4 tokens) and [5 | 6 7 | 8] (4) share one row of 8; [9 8 7 | 6 | 5 4 3 2] (8)
    has its own."""
    pairs = [TokenizedPair([1, 2], [3], [4]), TokenizedPair([9, 8, 7], [6], [5, 4, 3, 2]),
             TokenizedPair([5], [6, 7], [8])]  # fmt: skip
    b = collate_shared(pairs, pad_id=0, pack=True)
    assert b["pair_row"].tolist() == [1, 0, 1]
    assert b["input_ids"].tolist() == [[9, 8, 7, 6, 5, 4, 3, 2], [1, 2, 3, 4, 5, 6, 7, 8]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 3, 4, 5, 6], [0, 1, 2, 2, 0, 1, 2, 1]]
    assert b["chosen_src"].tolist() == [[1, 0, 0, 0], [2, 0, 0, 0], [4, 5, 0, 0]]  # within the row
    assert b["rejected_src"].tolist() == [[1, 0, 0, 0], [2, 4, 5, 6], [4, 0, 0, 0]]
    m = b["attention_mask_4d"].int()
    assert m.shape == (2, 1, 8, 8)
    assert m[1, 0].tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],  # pair 0: prompt
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # chosen
        [1, 1, 0, 1, 0, 0, 0, 0],  # rejected: the prompt and itself
        [0, 0, 0, 0, 1, 0, 0, 0],  # pair 2 sees nothing of pair 0
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 0, 0, 1],
    ]
    unpacked = collate_shared(pairs, pad_id=0)
    assert b["attention_mask"].sum() == unpacked["attention_mask"].sum() == 16  # the same real tokens
    assert b["input_ids"].numel() == 16 < unpacked["input_ids"].numel() == 24  # less padding


@pytest.mark.parametrize("response_only", [False, True])
def test_packed_gradients_and_micro_batches_equal_two_rows(toks, response_only):
    """Gradients through packed rows; and a batch packed for 2 accumulation micro-batches splits
    (engine.step.split_batch) into micro-batches that each give their pairs' two-row values."""
    model = make_model(toks, "llama", "sdpa")
    pairs = make_pairs(model.config.vocab_size, PACKED_SHAPES + [(2, 2, 2)])
    want_c, want_r = two_rows(model, pairs)
    batch = collate_shared(pairs, pad_id=0, pack=True)
    got_c, got_r = shared_prefix_logps(model, batch, response_only, chunk=4)
    want = grads(model, want_c.sum.sum() - 0.5 * want_r.mean.sum())
    got = grads(model, got_c.sum.sum() - 0.5 * got_r.mean.sum())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    micro = split_batch(collate_shared(pairs, pad_id=0, pack=True, groups=2), 2)
    assert [len(m["chosen_mask"]) for m in micro] == [3, 3]
    with torch.no_grad():
        for k, mb in enumerate(micro):
            part = slice(3 * k, 3 * k + 3)
            got_k = shared_prefix_logps(model, mb, response_only, chunk=4)
            want_k = [type(w)(*(x[part] for x in w)) for w in (want_c, want_r)]
            assert_same(got_k, want_k)
    # SHAPES do not pack (a row per pair), but the second micro-batch's rows come longest first
    alike = make_pairs(model.config.vocab_size)
    packed = collate_shared(alike, pad_id=0, pack=True, groups=2)
    assert packed["pair_row"].tolist() == [0, 1, 3, 2]
    want_c, want_r = two_rows(model, alike)
    with torch.no_grad():
        for k, mb in enumerate(split_batch(packed, 2)):
            part = slice(2 * k, 2 * k + 2)
            got_k = shared_prefix_logps(model, mb, response_only, chunk=4)
            assert_same(got_k, [type(w)(*(x[part] for x in w)) for w in (want_c, want_r)])


# --- response-only logits ------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1024, 3])
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_response_only_equals_sequence_logps(toks, family, chunk):
    model = make_model(toks, family)
    pairs = make_pairs(model.config.vocab_size)
    with torch.no_grad():
        assert_same(two_rows(model, pairs, response_only_logps, chunk=chunk), two_rows(model, pairs))
    got = two_rows(model, pairs, response_only_logps, chunk=chunk)
    want = two_rows(model, pairs)
    assert_same(got, want)
    loss = lambda out: out[0].sum.sum() - 0.3 * out[1].mean.sum()  # noqa: E731
    for g, w in zip(grads(model, loss(got)), grads(model, loss(want))):
        torch.testing.assert_close(g, w, **TOL)


def test_one_chunk_is_kept_for_backward_several_are_recomputed(toks, monkeypatch):
    """The LM head's chunks are checkpointed only when there are several; a single chunk keeps its
    logits for backward, with the same gradients bit for bit as checkpointing it."""
    import raydpo.ops.logprobs as lp

    model = make_model(toks, "llama")
    pairs = make_pairs(model.config.vocab_size)
    calls = []
    real = lp.checkpoint
    monkeypatch.setattr(lp, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loss = lambda out: out[0].sum.sum() - 0.3 * out[1].mean.sum()  # noqa: E731
    kept = grads(model, loss(two_rows(model, pairs, response_only_logps, chunk=1024)))
    assert calls == []
    several = grads(model, loss(two_rows(model, pairs, response_only_logps, chunk=4)))
    assert len(calls) > 1
    for g, w in zip(kept, several):
        torch.testing.assert_close(g, w, **TOL)
    calls.clear()
    monkeypatch.setattr(lp, "_head_logps", lambda head, hidden, targets, chunk: torch.cat(
        [real(lp._chunk_logps, head, hidden, targets, use_reentrant=False)]))  # fmt: skip
    recomputed = grads(model, loss(two_rows(model, pairs, response_only_logps, chunk=1024)))
    assert all(torch.equal(g, w) for g, w in zip(kept, recomputed))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_response_only_under_lora(toks, family):
    """A PEFT LoRA policy (adapters on attention and, for Llama, on the LM head itself)."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    targets = ["q_proj", "v_proj", "lm_head"] if family == "llama" else ["c_attn"]
    model = make_model(toks, family)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)  # B != 0
    policy = peft.get_peft_model(model, cfg).eval()
    if policy.get_output_embeddings() is None:
        pytest.skip("peft does not expose get_output_embeddings() on this model: no LM head to apply")
    pairs = make_pairs(model.config.vocab_size)
    got = two_rows(policy, pairs, response_only_logps, chunk=4)
    want = two_rows(policy, pairs)
    assert_same(got, want)
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    g = torch.autograd.grad(got[0].sum.sum() + got[1].sum.sum(), lora)
    w = torch.autograd.grad(want[0].sum.sum() + want[1].sum.sum(), lora)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, **TOL)
    with torch.no_grad(), policy.disable_adapter():  # the reference path DPO uses under LoRA
        assert_same(two_rows(policy, pairs, response_only_logps), two_rows(policy, pairs))


@pytest.mark.parametrize("field,value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.0625),
                                         ("logits_scaling", 8.0)])  # fmt: skip
def test_response_only_refuses_logit_transforms(toks, field, value):
    """Gemma 2/3 soft-cap, Cohere scales, Granite divides the logits after the head."""
    model = make_model(toks, "llama")
    setattr(model.config, field, value)
    b = collate(make_pairs(model.config.vocab_size), pad_id=0)
    with pytest.raises(NotImplementedError, match=field):
        response_only_logps(model, b["input_ids"], b["attention_mask"], b["labels"])
    with pytest.raises(NotImplementedError, match=field):
        shared_prefix_logps(model, collate_shared(make_pairs(model.config.vocab_size), pad_id=0), True)


def test_response_only_through_ddp(toks, tmp_path):
    """Through a (world size 1, gloo) DDP wrapper, as in training: the full forward runs."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = make_model(toks, "llama")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        pairs = make_pairs(model.config.vocab_size)
        got = two_rows(ddp, pairs, response_only_logps, chunk=4)
        want = two_rows(model, pairs)
        assert_same(got, want)
        (got[0].sum.sum() + got[1].sum.sum()).backward()
        g = [p.grad.clone() for p in some_params(model)]
        model.zero_grad()
        w = grads(model, want[0].sum.sum() + want[1].sum.sum())
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, **TOL)
    finally:
        dist.destroy_process_group()


# --- wired into the engine ------------------------------------------------------------------------


def test_collate_batch_layouts_and_the_empty_prompt_fallback():
    from raydpo.data.tokenize import collate_batch

    pairs = make_pairs(50)
    assert "chosen_src" in collate_batch(pairs, 0, "shared")
    assert collate_batch(pairs, 0, "pairs")["input_ids"].shape[0] == 2 * len(pairs)
    assert collate_batch(pairs, 0, "texts")["input_ids"].shape[0] == len(pairs)
    with_empty = pairs + [TokenizedPair([], [4, 5], [6])]  # nothing would predict its first token
    b = collate_batch(with_empty, 0, "shared")
    assert "chosen_src" not in b and b["input_ids"].shape[0] == 2 * len(with_empty)


def test_accumulation_splits_shared_batches_into_shared_micro_batches():
    from raydpo.engine.step import split_batch

    pairs = make_pairs(50, shapes=[(3, 1, 2), (2, 2, 1), (9, 4, 4), (5, 1, 3)])
    micro = split_batch(collate_shared(pairs, pad_id=0), 2)
    for mb, group in zip(micro, (pairs[:2], pairs[2:])):
        want = collate_shared(group, pad_id=0)  # as if collated alone: trimmed to its own widths
        assert want.keys() == mb.keys()
        for k in want:
            assert torch.equal(mb[k], want[k]), k


def _dpo_history(model_dir, tmp_path, **train):
    from raydpo.config import build_config
    from raydpo.data.schema import PreferenceRecord
    from raydpo.data.tokenize import pad_token_id, tokenize_pair
    from raydpo.engine.local import train_local
    from raydpo.methods.dpo import DPO
    from raydpo.models.loading import load_tokenizer

    cfg = build_config({
        "model": {"policy": str(model_dir)}, "optim": {"lr": 1e-3, "schedule": "constant"},
        "train": {"batch_size": 4, "max_steps": 2, "shuffle": False, "output_dir": str(tmp_path), **train},
    })  # fmt: skip
    tok = load_tokenizer(cfg.model)
    texts = [
        ("Review of Heat:", " a great film.", " dull."),
        ("Review of Up, a film:", " superb.", " awful plot."),
        (
            "Jaws:",
            " a brilliant story, I loved it: the shark, the sea, the score, the three men in a boat.",
            " terrible.",
        ),  # long enough for the others to share rows under train.packing
        ("Alien:", " moving.", " boring."),
    ]
    recs = [PreferenceRecord(prompt=p, chosen=c, rejected=r) for p, c, r in texts]
    pairs = [tokenize_pair(r, tok, 512, 256) for r in recs]
    if train.get("packing"):  # the data packs: 4 pairs in fewer rows (in each micro-batch of 2 as well)
        groups = train.get("grad_accum_steps", 1)
        assert len(collate_shared(pairs, pad_token_id(tok), pack=True, groups=groups)["input_ids"]) < 4
    return train_local(cfg, DPO, pairs, pad_token_id(tok))


@pytest.mark.parametrize("accum,packing", [(1, False), (2, False), (1, True), (2, True)])
def test_dpo_trains_the_same_with_prefix_sharing(tiny_llama_dir, tmp_path, accum, packing):
    """`train.prefix_sharing`, `train.packing` and `train.response_only_logits` change the arithmetic,
    not the run."""
    base = _dpo_history(tiny_llama_dir, tmp_path, prefix_sharing=False, response_only_logits=False)
    fast = _dpo_history(tiny_llama_dir, tmp_path, prefix_sharing=True, response_only_logits=True,
                        grad_accum_steps=accum, packing=packing)  # fmt: skip
    for b, f in zip(base, fast):
        for k in ("loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"):
            assert f[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    assert fast[0]["tokens_per_second"] > 0


def test_the_trainer_falls_back_to_two_rows_and_says_why(capsys):
    from types import SimpleNamespace

    from raydpo.config import build_config
    from raydpo.engine.loop import Trainer
    from raydpo.methods.dpo import DPO

    cfg = build_config({"model": {"policy": "x"}, "train": {"prefix_sharing": True}})
    trainer = Trainer(cfg, DPO, SimpleNamespace(rank=0, world=1), 1, None)
    trainer.objective = DPO.objective(cfg)
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    assert trainer.batch_layout(bloom, None) == "pairs"
    assert "two rows per pair (no prefix sharing): prefix sharing is verified for" in capsys.readouterr().err
    llama = build_model(build_tokenizer("llama"), arch="llama")
    assert trainer.batch_layout(llama, None) == "shared"
    assert trainer.batch_layout(llama, bloom) == "pairs"  # the reference must take it too
    trainer.cfg = build_config({"model": {"policy": "x"}, "train": {"prefix_sharing": True, "packing": True}})
    assert trainer.batch_layout(llama, None) == "packed"
    assert trainer.batch_layout(bloom, None) == "pairs"  # packing rides on prefix sharing's fallback
    off = build_config({"model": {"policy": "x"}, "train": {"prefix_sharing": False}})
    trainer.cfg = off
    assert trainer.batch_layout(llama, None) == "pairs"
