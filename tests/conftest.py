"""Shared fixtures: tiny random-init models and tokenizers saved to temp dirs (no network)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny Llama (random init) with a Llama-style tokenizer (BOS added, EOS </s>)."""
    from raydpo.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), style="llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from raydpo.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), style="gpt2", arch="gpt2", seed=0)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    """Builtin models are materialized under a per-session temp cache, not the user's home."""
    monkeypatch.setenv("RAYDPO_CACHE", str(tmp_path_factory.getbasetemp() / "raydpo-cache"))
