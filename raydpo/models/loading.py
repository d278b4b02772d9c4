"""Loading policy, reference, reward model and tokenizer (Hugging Face), and LoRA adapters.

`builtin:*` names are tiny random-init models materialized on first use (models/tiny.py), so every
command runs offline. Remote model code runs only with `model.trust_remote_code: true`. A hub name is
checked before loading: offline (HF_HUB_OFFLINE, or the hub unreachable) it must be in the local cache,
so a misspelt name fails at once and names its field instead of retrying the network.
"""

from __future__ import annotations

import difflib
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from raydpo.config import ModelConfig
from raydpo.errors import ConfigError
from raydpo.models.paths import local_model_dir
from raydpo.models.tiny import BUILTIN_MODELS, builtin_model_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_PROBE_TIMEOUT_S = 3.0
_unreachable: dict[str, str | None] = {}  # hub endpoint → why a probe got no answer (None: it answered)


def resolve_model_path(name: str, field: str = "model.policy") -> str:
    """`builtin:*` → its materialized local directory; a local path must exist; else a hub name, which
    offline must be in the Hugging Face cache. `field` is the config key the name came from (errors name it).
    """
    if name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            raise ConfigError(
                f"{field}: unknown builtin model {name!r}; allowed: {', '.join(BUILTIN_MODELS)}"
            )
        return str(builtin_model_dir(name))
    local = local_model_dir(name, field)
    return str(local) if local is not None else _check_hub_name(name, field)


def _hub_offline() -> str | None:
    """Why the hub cannot be used ('HF_HUB_OFFLINE=1', 'cannot reach <endpoint>: ...'), or None."""
    for var in _OFFLINE_VARS:
        value = os.environ.get(var, "")
        if value.strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"{var}={value}"
    endpoint = hf_constants.ENDPOINT
    if endpoint not in _unreachable:
        _unreachable[endpoint] = _probe(endpoint)
    why = _unreachable[endpoint]
    return None if why is None else f"cannot reach {endpoint}: {why}"


def _probe(url: str, timeout: float = _PROBE_TIMEOUT_S) -> str | None:
    """One HEAD request, bounded by `timeout` in all (DNS included): None when any HTTP status came
    back, else why not."""
    result: list[str | None] = []

    def head() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result.append(None)
        except urllib.error.HTTPError:  # a status code is an answer
            result.append(None)
        except urllib.error.URLError as e:
            result.append(str(e.reason))
        except (OSError, ValueError) as e:
            result.append(str(e) or type(e).__name__)

    t = threading.Thread(target=head, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"


def _check_hub_name(name: str, field: str) -> str:
    """Online: the name, loaded from the hub. Offline: the cached snapshot directory, or a ConfigError."""
    why = _hub_offline()
    if why is None:
        return name
    files = ("config.json", "tokenizer_config.json") if field == "model.tokenizer" else ("config.json",)
    for filename in files:
        cached = try_to_load_from_cache(name, filename, cache_dir=hf_constants.HF_HUB_CACHE)
        if isinstance(cached, str):
            # A directory, so loading reads the cache instead of retrying the unreachable hub.
            return name if why.startswith(_OFFLINE_VARS) else str(Path(cached).parent)
    close = difflib.get_close_matches(name, _cached_models(), n=1)
    hint = f"did you mean {close[0]!r} (cached)? Else give" if close else "give"
    raise ConfigError(
        f"{field}: {name!r} is not a local directory and is not in the Hugging Face cache "
        f"(offline: {why}); {hint} a model directory, or download it first where the hub is "
        f"reachable (hf download {name})"
    )


def _cached_models() -> list[str]:
    """Repo ids of the models in the Hugging Face cache (`models--org--name` folders)."""
    try:
        entries = os.listdir(hf_constants.HF_HUB_CACHE)
    except OSError:
        return []
    return [e.removeprefix("models--").replace("--", "/") for e in entries if e.startswith("models--")]


def load_tokenizer(cfg: ModelConfig):
    field = "model.tokenizer" if cfg.tokenizer else "model.policy"
    path = resolve_model_path(cfg.tokenizer or cfg.policy, field)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ConfigError(
            f"{field}: cannot load a tokenizer from {path!r}: {str(e).splitlines()[0]}"
        ) from None
    if tok.eos_token_id is None:
        raise ConfigError(f"{field}: tokenizer {path!r} has no EOS token; DPO responses must end with one")
    return tok


def _load_causal_lm(name: str, cfg: ModelConfig, field: str):
    path = resolve_model_path(name, field)
    kwargs = {"dtype": _DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ConfigError(f"{field}: cannot load {path!r}: {str(e).splitlines()[0]}") from None
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
        return _load_causal_lm(str(checkpoint), cfg, "checkpoint")
    model = _load_causal_lm(cfg.policy, cfg, "model.policy")
    if cfg.lora is None:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model  # only for LoRA: importing peft takes seconds

    if checkpoint is not None:
        return PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    lcfg = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, lcfg)


def load_reward_model(cfg: ModelConfig, checkpoint: str | Path | None = None):
    """A scalar-head sequence classifier on the policy architecture (method=reward_model): the policy's
    weights with a new head (seeded by the caller), or a saved reward model directory."""
    field = "reward model" if checkpoint is not None else "model.policy"
    path = str(checkpoint) if checkpoint is not None else resolve_model_path(cfg.policy, field)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
    except OSError as e:
        raise ConfigError(
            f"{field}: cannot load {path!r} as a reward model: {str(e).splitlines()[0]}"
        ) from None
    if cfg.disable_dropout:
        disable_dropout(model)
    return model


def load_reference(cfg: ModelConfig):
    """A frozen reference in eval mode, or None when the policy's LoRA base serves as reference."""
    if cfg.lora is not None and cfg.reference is None:
        return None
    field = "model.reference" if cfg.reference else "model.policy"
    model = _load_causal_lm(cfg.reference or cfg.policy, cfg, field)
    model.eval().requires_grad_(False)
    return model
