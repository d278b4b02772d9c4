"""Loading policy, reference, reward model and tokenizer (Hugging Face), and LoRA adapters.

`builtin:*` names are tiny random-init models materialized on first use (models/tiny.py), so every
command runs offline. Remote model code runs only with `model.trust_remote_code: true`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from raydpo.config import ModelConfig
from raydpo.errors import ConfigError
from raydpo.models.tiny import BUILTIN_MODELS, builtin_model_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name: str) -> str:
    """`builtin:*` → its materialized local directory; a local path must exist; else a hub name."""
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise ConfigError(f"model: unknown builtin model {name!r}; allowed: {', '.join(BUILTIN_MODELS)}")
        return str(builtin_model_dir(name))
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise ConfigError(f"model: path {name!r} does not exist or is not a directory")
    return str(Path(name).expanduser()) if looks_local else name


def load_tokenizer(cfg: ModelConfig):
    path = resolve_model_path(cfg.tokenizer or cfg.policy)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ConfigError(f"model.tokenizer: cannot load {path!r}: {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"model.tokenizer: {path!r} has no EOS token; DPO responses must end with one")
    return tok


def _load_causal_lm(name: str, cfg: ModelConfig):
    path = resolve_model_path(name)
    kwargs = {"dtype": _DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(f"model: cannot load {path!r}: {str(e).splitlines()[0]}") from None
    if cfg.disable_dropout:
        disable_dropout(model)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def load_policy(cfg: ModelConfig, checkpoint: str | Path | None = None):
    """The trainable policy; with `cfg.lora` a peft model whose base is frozen.

    `checkpoint` is a `model/` directory of a raydpo checkpoint: the full model, or the adapter.
    """
    if checkpoint is not None and cfg.lora is None:
        return _load_causal_lm(str(checkpoint), cfg)
    model = _load_causal_lm(cfg.policy, cfg)
    if checkpoint is not None:
        return PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    if cfg.lora is not None:
        lcfg = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
        )  # fmt: skip
        model = get_peft_model(model, lcfg)
    return model


def load_reward_model(cfg: ModelConfig, checkpoint: str | Path | None = None):
    """A scalar-head sequence classifier on the policy architecture (method=reward_model): the policy's
    weights with a new head (seeded by the caller), or a saved reward model directory."""
    path = str(checkpoint) if checkpoint is not None else resolve_model_path(cfg.policy)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:
        raise ConfigError(
            f"model: cannot load {path!r} as a reward model: {str(e).splitlines()[0]}"
        ) from None
    if cfg.disable_dropout:
        disable_dropout(model)
    return model


def load_reference(cfg: ModelConfig):
    """A frozen reference in eval mode, or None when the policy's LoRA base serves as reference."""
    if cfg.lora is not None and cfg.reference is None:
        return None
    model = _load_causal_lm(cfg.reference or cfg.policy, cfg)
    model.eval().requires_grad_(False)
    return model
