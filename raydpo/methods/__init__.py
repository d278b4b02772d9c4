"""The method registry: every training method is one `engine.method.Method` record, trained by the
one engine (docs/architecture.md, "Methods"). Adding a method is one record and one objective."""

from __future__ import annotations

from raydpo.config import METHODS as METHOD_NAMES
from raydpo.config import RunConfig
from raydpo.engine import launch
from raydpo.engine.method import Method
from raydpo.methods.dpo import DPO
from raydpo.methods.ppo import PPO, PPO_GT
from raydpo.methods.reward_model import REWARD_MODEL
from raydpo.methods.supervised import PREFERRED_FT, SFT
from raydpo.methods.unlikelihood import UNLIKELIHOOD

METHODS: dict[str, Method] = {
    m.name: m for m in (DPO, SFT, PREFERRED_FT, REWARD_MODEL, PPO, PPO_GT, UNLIKELIHOOD)
}
assert set(METHODS) == set(METHOD_NAMES), "config.METHODS and the registry must name the same methods"


def get_method(name: str) -> Method:
    return METHODS[name]  # RunConfig.method is validated against config.METHODS


def train(cfg: RunConfig, log=print, **kwargs) -> dict:
    """Train `cfg` with its method on Ray (engine.launch.run): what `raydpo train` runs."""
    return launch.run(cfg, get_method(cfg.method), log, **kwargs)
