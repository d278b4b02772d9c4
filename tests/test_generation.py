"""Batched sampling (raydpo.models.generation) on tiny random-init models: order, seeding, EOS, padding."""

import pytest
import torch

from raydpo.models.generation import Rollout, generate, mask_after_eos, sample_responses
from raydpo.models.tiny import build_model, build_tokenizer
from raydpo.tasks.sentiment import make_corpus

PROMPTS = ["the movie was", "i thought the acting", "the soundtrack", "in my opinion the director"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    """(model, tokenizer): llama style has BOS and pad != EOS; gpt2 style has no pad, so pad = EOS."""
    tok = build_tokenizer(request.param, corpus=make_corpus(2000), vocab_size=512)
    model = build_model(tok, arch=request.param, hidden=32, layers=1, heads=2, seed=0)
    return model, tok


@pytest.fixture
def eos_likely(lm):
    """The same model with +4.5 on the EOS logit: with ~500 near-uniform logits, P(EOS) ≈ 0.15 per
    step, so most 24-token samples stop early but few stop at the first token."""
    model, tok = lm
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = 4.5
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias)
    yield model, tok
    handle.remove()


def test_n_completions_per_prompt_in_order(lm):
    model, tok = lm
    out = generate(model, tok, PROMPTS, n=3, max_new_tokens=8, seed=0, batch_size=5)
    assert len(out) == len(PROMPTS) and all(len(c) == 3 for c in out)
    assert all(isinstance(t, str) for c in out for t in c)
    # Prompt order: generating one prompt alone gives the same greedy text as inside the batch.
    greedy = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0)
    for i, p in enumerate(PROMPTS):
        assert generate(model, tok, [p], max_new_tokens=8, temperature=0)[0] == greedy[i]


def test_seeding(lm):
    model, tok = lm
    a = generate(model, tok, PROMPTS, n=2, max_new_tokens=12, seed=7)
    assert generate(model, tok, PROMPTS, n=2, max_new_tokens=12, seed=7) == a
    assert generate(model, tok, PROMPTS, n=2, max_new_tokens=12, seed=8) != a
    assert len({t for c in a for t in c}) > 1  # rows of one batch draw different samples


def test_global_rng_and_train_mode_untouched(lm):
    model, tok = lm
    model.train()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    generate(model, tok, PROMPTS, max_new_tokens=4, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert model.training
    model.eval()
    sample_responses(model, tok, PROMPTS, max_new_tokens=4)
    assert not model.training


def test_greedy_is_deterministic_and_seed_free(lm):
    model, tok = lm
    a = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=0, seed=0)
    assert generate(model, tok, PROMPTS, max_new_tokens=10, temperature=0, seed=99) == a


def test_saved_generation_config_does_not_change_sampling(lm):
    """HF falls back to model.generation_config (then top_k=50) for unset knobs; we pin them, so a
    saved top_k=1 must not turn temperature sampling into greedy decoding."""
    model, tok = lm
    greedy = generate(model, tok, PROMPTS, n=2, max_new_tokens=10, temperature=0)
    old = model.generation_config.top_k
    model.generation_config.top_k = 1
    try:
        sampled = generate(model, tok, PROMPTS, n=2, max_new_tokens=10, seed=0)
    finally:
        model.generation_config.top_k = old
    assert sampled != greedy
    assert generate(model, tok, PROMPTS, n=2, max_new_tokens=10, seed=0, top_k=1) == greedy


def test_rollout_query_left_padding(lm):
    model, tok = lm
    r = sample_responses(model, tok, PROMPTS, max_new_tokens=6, temperature=1.0, seed=0)
    assert isinstance(r, Rollout)
    assert r.query_ids.dtype == torch.long and r.query_ids.shape == r.query_mask.shape
    assert bool(r.query_mask[:, -1].all())  # every prompt ends in the last column
    for b, p in enumerate(PROMPTS):
        ids = tok(p)["input_ids"]
        width = r.query_ids.shape[1]
        assert r.query_mask[b].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
        assert r.query_ids[b, width - len(ids) :].tolist() == ids
        if tok.bos_token_id is not None and tok("x")["input_ids"][0] == tok.bos_token_id:
            assert ids[0] == tok.bos_token_id  # llama style: BOS added to prompts


def test_rollout_masks_stop_after_first_eos(eos_likely):
    model, tok = eos_likely
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = PROMPTS * 8
    r = sample_responses(model, tok, prompts, max_new_tokens=24, temperature=1.0, seed=0)
    assert r.response_ids.shape == r.response_mask.shape and r.response_ids.shape[0] == len(prompts)
    stopped = 0
    for ids, mask, text in zip(r.response_ids.tolist(), r.response_mask.tolist(), r.texts):
        cut = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
        stopped += cut < len(ids) or ids[-1] == tok.eos_token_id
        assert mask == [1] * cut + [0] * (len(ids) - cut)  # the EOS itself is covered
        assert ids[cut:] == [pad] * (len(ids) - cut)
        assert text == tok.decode(ids[:cut], skip_special_tokens=True)
        assert tok.eos_token not in text
    assert stopped >= len(prompts) // 2  # the test exercised EOS
    assert r.response_mask.sum(-1).min() >= 1
    # Same batch and seed as sample_responses → same texts from generate.
    texts = generate(model, tok, prompts, max_new_tokens=24, seed=0, batch_size=len(prompts))
    assert [c[0] for c in texts] == r.texts


def test_generate_cuts_text_at_eos(eos_likely):
    """Completions never carry text from after the first EOS: with n=6 and batch_size=6, batch b of
    `generate` is exactly sample_responses([prompt b] * 6, seed + b), whose texts are cut at EOS."""
    model, tok = eos_likely
    out = generate(model, tok, PROMPTS, n=6, max_new_tokens=24, seed=3, batch_size=6)
    for b in range(len(PROMPTS)):  # batch b holds prompt b's 6 samples, seeded seed + b
        r = sample_responses(model, tok, [PROMPTS[b]] * 6, max_new_tokens=24, seed=3 + b)
        assert out[b] == r.texts


def test_mask_after_eos_by_hand():
    """EOS=2, pad=0. Row 0: EOS at index 1 → mask [1,1,0,0]; row 1: no EOS → all ones;
    row 2: pad == EOS style, EOS at 0 then EOS fill → [1,0,0,0]."""
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 2, 2, 2]])
    out, mask = mask_after_eos(ids, eos_id=2, pad=0)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]


def test_bad_arguments(lm):
    model, tok = lm
    with pytest.raises(ValueError):
        generate(model, tok, PROMPTS, n=0)
    with pytest.raises(ValueError):
        generate(model, tok, PROMPTS, temperature=-1.0)
    with pytest.raises(ValueError):
        sample_responses(model, tok, PROMPTS, max_new_tokens=0)
