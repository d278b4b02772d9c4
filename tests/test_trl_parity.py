"""Parity with TRL's DPOTrainer (the field's reference implementation, a test-only dependency).

Same tiny random-init Llama, same 4 preference pairs, two optimizer steps with AdamW at a constant
learning rate and gradient clipping 1.0, batch = all 4 pairs (so the data order cannot differ).
Step 1 has policy == reference (sigmoid loss is ln 2 whatever the data); the log-probs at step 1
test tokenization and masking, the gradient norm tests the backward pass (a scaled gradient would
pass the losses alone: after AdamW's first step only its signs matter), and step 2 tests the update.
raydpo's side is `engine.local.train_local`: the loop every Ray Train worker runs, with one worker.
"""

import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

PAIRS = [
    {"prompt": "Review of Heat:", "chosen": " a great film, I loved it.", "rejected": " a dull film."},
    {"prompt": "Review of Alien:", "chosen": " wonderful and moving.", "rejected": " boring, I hated it."},
    {"prompt": "Review of Up:", "chosen": " superb acting.", "rejected": " awful plot and bad acting."},
    {"prompt": "Review of Jaws:", "chosen": " a brilliant story.", "rejected": " terrible."},
]
KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected", "grad_norm"]  # fmt: skip
LR = 1e-3


def _trl_history(model_dir, loss_type, beta, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    logs = []

    class Grab(TrainerCallback):
        def on_log(self, args, state, control, logs_=None, **kw):
            entry = kw.get("logs") or logs_
            if entry and "loss" in entry:
                logs.append(dict(entry))

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=2, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, logging_steps=1, report_to=[],
        beta=beta, loss_type=[loss_type], seed=0, use_cpu=True, save_strategy="no", optim="adamw_torch",
        weight_decay=0.0, bf16=False, fp16=False, max_length=None, disable_dropout=True,
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model_dir)
    trainer = DPOTrainer(
        model=str(model_dir), args=args, train_dataset=Dataset.from_list(PAIRS), processing_class=tok,
        callbacks=[Grab()],
    )  # fmt: skip
    trainer.train()
    return logs


def _raydpo_history(model_dir, loss_type, beta, tmp_path):
    from raydpo.config import build_config
    from raydpo.data.schema import PreferenceRecord
    from raydpo.data.tokenize import pad_token_id, tokenize_pair
    from raydpo.engine.local import train_local
    from raydpo.methods.dpo import DPO
    from raydpo.models.loading import load_tokenizer

    cfg = build_config({
        "model": {"policy": str(model_dir)},
        "loss": {"name": loss_type, "beta": beta},
        "optim": {"name": "adamw", "lr": LR, "max_grad_norm": 1.0, "schedule": "constant"},
        "train": {"batch_size": 4, "max_steps": 2, "shuffle": False, "seed": 0, "output_dir": str(tmp_path)},
    })  # fmt: skip
    tok = load_tokenizer(cfg.model)
    pairs = [tokenize_pair(PreferenceRecord(**p), tok, 512, 256) for p in PAIRS]
    return train_local(cfg, DPO, pairs, pad_token_id(tok))  # the Ray workers' loop, with one worker


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("ipo", 0.1), ("hinge", 0.5)])
def test_matches_trl_over_two_steps(tiny_llama_dir, tmp_path, loss_type, beta):
    theirs = _trl_history(tiny_llama_dir, loss_type, beta, tmp_path)
    ours = _raydpo_history(tiny_llama_dir, loss_type, beta, tmp_path)
    assert len(theirs) == 2 and len(ours) == 2
    for step, (t, o) in enumerate(zip(theirs, ours), start=1):
        for k in KEYS:
            assert o[k] == pytest.approx(t[k], abs=1e-6, rel=1e-5), (
                f"step {step} {k}: raydpo {o[k]} vs TRL {t[k]}"
            )
    # The second step must differ from the first, or the comparison proves nothing about the update.
    assert abs(ours[1]["logps/chosen"] - ours[0]["logps/chosen"]) > 1e-3
