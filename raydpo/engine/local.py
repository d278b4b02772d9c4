"""The single-process path: the same loop as a Ray Train worker, with one worker and no Ray.

Tests (TRL parity, accumulation invariance, seeding) run production code through it; reports are
kept in memory and checkpoints, when asked for, are written under `checkpoint_dir`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raydpo.config import RunConfig
from raydpo.data.tokenize import TokenizedPair
from raydpo.engine.loop import Trainer, WorkerContext
from raydpo.engine.method import Method
from raydpo.engine.sources import ListSource, PromptSource


def _steps(cfg: RunConfig, n: int, per_step: int) -> int:
    per_epoch = n // per_step
    if per_epoch == 0:
        raise ValueError(f"{n} rows do not fill one batch of {per_step}")
    return cfg.train.max_steps or per_epoch * cfg.train.epochs


def train_local(cfg: RunConfig, method: Method, rows: list[TokenizedPair] | list[str], pad_id: int, *,
                policy=None, reference=None, checkpoint_dir: Path | None = None,
                resume_from: Path | None = None,
                reference_logps: dict[str, torch.Tensor] | None = None) -> list[dict]:  # fmt: skip
    """Train in this process on tokenized pairs (or prompts, for on-policy methods). Returns the
    metrics of every step (floats). `policy` (with `reference`, None for none) replaces the models
    the method would load (tests inspect their weights afterwards). `reference_logps`: each pair's
    precomputed reference log-probs (`ref_chosen`, `ref_rejected`: (N,) each, as
    `engine.reference.ScoreReference` gives them); the batches carry them and no reference is loaded."""
    device = torch.device("cpu")
    prompts = method.data == "prompts"
    per_step = cfg.ppo.rollout_batch_size if prompts else cfg.train.batch_size
    total = _steps(cfg, len(rows), per_step)

    def prepare(p, r):
        return p.to(device), (r.to(device) if r is not None else None), device

    def sources(dev, layout):
        if prompts:
            return PromptSource(rows, per_step, max(1, len(rows) // per_step), cfg.train.seed, 0, 1), None
        t = cfg.train
        source = ListSource(rows, per_step, t.seed, pad_id, layout, dev, t.group_by_length,
                            t.grad_accum_steps, reference_logps)  # fmt: skip
        return source, None

    def report(row: dict, ckpt_fn) -> None:
        if ckpt_fn is not None and checkpoint_dir is not None:
            ckpt_fn(Path(checkpoint_dir) / f"checkpoint_{row['step']:06d}")

    ctx = WorkerContext(
        rank=0,
        world=1,
        prepare=prepare,
        sources=sources,
        report=report,
        checkpoint=resume_from,
        models=(policy, reference) if policy is not None else None,
        reference_in_data=reference_logps is not None,
    )
    trainer = Trainer(cfg, method, ctx, total, None)
    pos = trainer.setup()
    return trainer.train(pos)
