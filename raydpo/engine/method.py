"""The record the engine trains from: one `Method` per training method (the registry is `raydpo.methods`).

The engine knows nothing about DPO, reward models or PPO by name. A method tells it what its data
rows are, which models to load, the objective to minimize and, for on-policy methods, a rollout
phase that turns each batch into the minibatches the objective is applied to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from raydpo.config import RunConfig
from raydpo.models.loading import load_policy

Metrics = dict[str, torch.Tensor]  # 0-d tensors: no host sync until the engine averages them


@dataclass(frozen=True)
class Objective:
    """(model, reference or None, batch) -> (scalar loss, detached metrics)."""

    fn: Callable[[Any, Any, dict], tuple[torch.Tensor, Metrics]]
    paired: bool  # a batch holds 2B rows (B chosen, then B rejected): accumulation splits it in pairs
    shared_prefix: bool = False  # also takes `collate_shared`'s B rows (ops.logprobs.pair_logps reads both)
    reads_reference: bool = False  # uses `ref_chosen` / `ref_rejected` (B,) in a batch when present
    #   (engine/reference.py precomputes them) instead of running the reference model
    batch_reference: Callable[[Any, Any, dict], dict[str, torch.Tensor]] | None = None  # (model, reference,
    #   batch) -> those (B,) entries for a whole batch, or {} (none needed, or already there): the reference
    #   runs once per batch, ahead of the policy and its micro-batches (engine.step.train_step)

    def __call__(self, model, reference, batch: dict) -> tuple[torch.Tensor, Metrics]:
        return self.fn(model, reference, batch)


class Rollout(Protocol):
    """An on-policy phase run on each worker before the updates of every step (PPO's sampling)."""

    def __init__(self, cfg: RunConfig, policy, reference, device: torch.device, rank: int, world: int): ...

    def __call__(self, prompts: list[str], step: int) -> tuple[list[dict], Metrics]:
        """This step's minibatches (each gets one optimizer update) and the rollout's own metrics."""

    def update(self, metrics: dict[str, float], world: int) -> None:
        """After the step, with metrics averaged over workers (e.g. an adaptive KL coefficient)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _no_reference(cfg: RunConfig) -> bool:
    return False


def _load_policy(cfg: RunConfig, checkpoint: Path | None):
    return load_policy(cfg.model, checkpoint=checkpoint)


@dataclass(frozen=True)
class Method:
    """One training method; see docs/architecture.md ("Methods") for how to add one."""

    name: str  # RunConfig.method
    objective: Callable[[RunConfig], Objective]  # the loss of one batch (or one rollout minibatch)
    data: Literal["pairs", "texts", "prompts"]  # what data.source holds
    metrics: tuple[str, ...]  # names its steps report (beyond grad_norm, learning_rate, throughput)
    progress: tuple[tuple[str, str], ...] = (("loss", "loss"),)  # (label, metric) on the console line
    kind: str = "baseline"  # MLflow raydpo.kind of its runs: train (the DPO family) or baseline
    params: tuple[str, ...] = ()  # config sections logged as MLflow params besides the common ones
    load_model: Callable[[RunConfig, Path | None], Any] = _load_policy  # fresh, or from a checkpoint's model/
    uses_reference: Callable[[RunConfig], bool] = _no_reference  # load a frozen reference policy
    rollout: type[Rollout] | None = None  # on-policy phase (PPO); None = train on the batches as given
    check: Callable[[RunConfig], None] | None = None  # driver-side checks before Ray starts (UserError)
    eval_metrics: tuple[str, ...] = field(default=())  # metrics on the eval split (as eval/<name>)

    @property
    def reported(self) -> tuple[str, ...]:
        """Every metric name a run of this method can report (sweeps validate their metric against it)."""
        common = ("grad_norm", "learning_rate", "pairs_per_second")
        common += () if self.data == "prompts" else ("tokens_per_second",)  # rollouts count no tokens
        return self.metrics + common + tuple(f"eval/{m}" for m in self.eval_metrics)
