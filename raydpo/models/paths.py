"""What a model name in a config names, decided without importing torch or transformers: a built-in
model, a local folder (which must exist), or a Hugging Face hub name (`models.loading` checks it)."""

from __future__ import annotations

from pathlib import Path

from raydpo.errors import ConfigError


def local_model_dir(name: str, field: str = "model.policy") -> Path | None:
    """The local folder `name` names, or None for a `builtin:` or hub name. A name that looks like a
    path (starts with . / or ~, exists, or has more than one /) must be a folder: else a ConfigError
    naming `field`, the config key the name came from."""
    if name.startswith("builtin:"):
        return None
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if not looks_local:
        return None
    if not Path(name).expanduser().is_dir():
        raise ConfigError(f"{field}: path {name!r} does not exist or is not a directory")
    return Path(name).expanduser()


WEIGHT_FILES = (".safetensors", ".bin", ".pt")  # what `weight_bytes` counts in a model directory


def weight_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files (WEIGHT_FILES) directly in a model directory: its size, without torch."""
    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.name.endswith(WEIGHT_FILES))
