"""Tiny random-init models and tokenizers, built offline, saved in Hugging Face format.

They back the `builtin:tiny-llama` / `builtin:tiny-gpt2` / `builtin:tiny-qwen` model names (so
`raydpo train` runs with nothing to download) and the tests. `builtin:tiny-qwen` is a chat model (a
Qwen2 architecture with a ChatML template), so conversational data trains offline too. A saved
directory loads with `AutoTokenizer.from_pretrained` and `AutoModelForCausalLM.from_pretrained` like
any hub model, so the real loading path is used.

Tokenizer styles mirror the three families whose special tokens differ:
- "llama": BOS `<s>` prepended by the tokenizer, EOS `</s>`, pad `<pad>`.
- "gpt2":  no BOS added, EOS = `<|endoftext|>` (also used as BOS/pad, as GPT-2 does).
- "qwen":  no BOS, EOS `<|endoftext|>`, pad `<|endoftext|>`, ChatML template with `<|im_end|>`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from raydpo.data.builtin import tiny_prefs
from raydpo.errors import ConfigError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIALS = {
    "llama": {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"},
    "gpt2": {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None, "unk": None},
    "qwen": {"bos": None, "eos": "<|endoftext|>", "pad": "<|endoftext|>", "unk": None},
}


def default_corpus() -> list[str]:
    """Text the builtin tokenizer is trained on: the builtin preference pairs."""

    return [r["prompt"] + r["chosen"] + r["rejected"] for r in tiny_prefs(n=256)]


def build_tokenizer(style: str = "llama", corpus: list[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `corpus` and wrap it as a PreTrainedTokenizerFast."""

    sp = _SPECIALS[style]
    specials = [t for t in dict.fromkeys(sp.values()) if t] + (
        ["<|im_start|>", "<|im_end|>"] if style == "qwen" else []
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or default_corpus(), trainer)
    if style == "llama":  # Llama tokenizers prepend BOS when add_special_tokens=True
        bos_id = tok.token_to_id(sp["bos"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{sp['bos']} $A", pair=f"{sp['bos']} $A $B", special_tokens=[(sp["bos"], bos_id)]
        )
    kwargs = {k + "_token": v for k, v in sp.items() if v}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    if style == "qwen":
        out.chat_template = CHATML
    return out


def model_config(
    tokenizer, arch: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4,
    kv_heads: int | None = None, intermediate: int | None = None, tie: bool = False,
):  # fmt: skip
    """The Hugging Face config of a random-init causal LM (`build_model`): `kv_heads` (grouped-query
    attention; default `heads`), `intermediate` (MLP width; default 2 × hidden) and `tie` (input and
    output embeddings shared) for Llama and Qwen2; 512 positions."""
    vocab = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    ids["pad_token_id"] = tokenizer.pad_token_id
    if arch in ("llama", "qwen2"):
        return (LlamaConfig if arch == "llama" else Qwen2Config)(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
            max_position_embeddings=512, tie_word_embeddings=tie, **ids,
        )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **ids
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; allowed: llama, gpt2, qwen2")


def build_model(tokenizer, arch: str = "llama", seed: int = 0, **shape):
    """A random-init causal LM, sized for tests by default (~100k parameters); `shape`: `model_config`'s."""
    cfg = model_config(tokenizer, arch, **shape)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def save_tiny(
    path: str | os.PathLike, style: str = "llama", arch: str = "llama", seed: int = 0, **model_kw
) -> Path:
    """Build a tiny tokenizer + model and save both to `path` (HF layout). Returns the path."""
    path = Path(path)
    tok = build_tokenizer(style)
    model = build_model(tok, arch=arch, seed=seed, **model_kw)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path


BUILTIN_MODELS = {  # name → (tokenizer style, architecture)
    "builtin:tiny-llama": ("llama", "llama"),
    "builtin:tiny-gpt2": ("gpt2", "gpt2"),
    "builtin:tiny-qwen": ("qwen", "qwen2"),  # a chat model: ChatML template, for conversational data
}


def builtin_model_dir(name: str) -> Path:
    """Materialize a builtin model once per machine (under RAYDPO_CACHE, default ~/.cache/raydpo)."""
    if name not in BUILTIN_MODELS:
        raise ConfigError(f"unknown builtin model {name!r}; allowed: {', '.join(BUILTIN_MODELS)}")
    style, arch = BUILTIN_MODELS[name]
    root = Path(os.environ.get("RAYDPO_CACHE", Path.home() / ".cache" / "raydpo"))
    target = root / "models" / name.split(":", 1)[1]
    if not (target / "config.json").exists():
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        save_tiny(tmp, style=style, arch=arch)
        try:
            os.replace(tmp, target)  # atomic: concurrent builders never see half a directory
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return target
