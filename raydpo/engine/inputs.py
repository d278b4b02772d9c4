"""The input checks that need neither torch's models, Ray nor transformers: the model folders and data
files a run names exist. The CLI runs them before it loads the engine, so a misspelt path fails in
seconds instead of after every import; `engine.launch.preflight` then checks everything (hub names,
rows, chat templates, the tracking server, storage)."""

from __future__ import annotations

from raydpo.config import RunConfig
from raydpo.data.readers import check_source
from raydpo.models.paths import local_model_dir


def check_paths(cfg: RunConfig) -> None:
    """ConfigError or DataError (one line, naming the field or the source) for a missing local path."""
    local_model_dir(cfg.model.policy, "model.policy")
    if cfg.model.reference:
        local_model_dir(cfg.model.reference, "model.reference")
    for source in filter(None, [cfg.data.source, cfg.data.eval_source]):
        check_source(source, cfg.data.format)
