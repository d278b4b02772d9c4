"""One reward-model scorer: a pair's score at inference equals its training-time score."""

import pytest
import torch

from raydpo.config import build_config
from raydpo.data.schema import PreferenceRecord
from raydpo.data.tokenize import collate, pad_token_id, tokenize_pair
from raydpo.methods.reward_model import bradley_terry
from raydpo.models.loading import load_reward_model, load_tokenizer
from raydpo.models.scoring import score_texts
from raydpo.ops.logprobs import reward_scores

PAIRS = [
    {"prompt": "Review of Heat:", "chosen": " a great film, I loved it.", "rejected": " a dull film."},
    {
        "prompt": "Review of Up:",
        "chosen": " superb acting.",
        "rejected": " awful plot and bad acting, sadly.",
    },
]


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_inference_scores_equal_training_scores(model, request):
    """Training reads r at the EOS of prompt + response + EOS rows; `score_texts` must build the same
    rows from text (the old scorer tokenized prompt + response as one string without the EOS)."""
    cfg = build_config({"method": "reward_model", "model": {"policy": str(request.getfixturevalue(model))}})
    torch.manual_seed(0)
    tok, rm = load_tokenizer(cfg.model), load_reward_model(cfg.model).eval()
    pairs = [tokenize_pair(PreferenceRecord(**p), tok, 512, 256) for p in PAIRS]
    batch = collate(pairs, pad_token_id(tok))  # the training batch: 2B rows, chosen then rejected
    with torch.no_grad():
        trained = reward_scores(rm, batch["input_ids"], batch["attention_mask"]).tolist()
        _, metrics = bradley_terry(rm, None, batch)
    prompts = [p["prompt"] for p in PAIRS] * 2
    responses = [p["chosen"] for p in PAIRS] + [p["rejected"] for p in PAIRS]
    inferred = score_texts(rm, tok, prompts, responses, batch_size=3)  # other batching, other padding
    assert inferred == pytest.approx(trained, abs=1e-6)
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(inferred[:2]) / 2, abs=1e-6)
