"""The single-process training loop: optimizer, warm-up schedule, clipping, accumulation, seeding.

Ray Train workers reuse these pieces (`build_optimizer`, `build_scheduler`, `epoch_batches`,
`optimizer_step`); `train_local` strings them together for one process.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

import torch

from raydpo.config import OptimConfig, RunConfig
from raydpo.data.tokenize import TokenizedPair, collate
from raydpo.train.step import train_step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is optional here
        pass


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.RMSprop(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)  # never 0: the first step already moves
    if cfg.schedule == "constant":
        return 1.0
    rest = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / rest)
    if cfg.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(opt, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))


def epoch_batches(pairs: list, batch_size: int, seed: int, epoch: int, shuffle: bool) -> Iterator[list]:
    """Full batches of one epoch; the order is a seeded permutation that differs per epoch.
    The last incomplete batch is dropped (every step sees batch_size pairs)."""
    order = list(range(len(pairs)))
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(pairs), generator=g).tolist()
    for i in range(0, len(order) - batch_size + 1, batch_size):
        yield [pairs[j] for j in order[i : i + batch_size]]


def optimizer_step(policy, opt, sched, max_grad_norm: float | None) -> tuple[torch.Tensor, float]:
    """Clip, step, advance the schedule. Returns (pre-clip grad norm, learning rate used)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm.detach(), lr


def total_steps(cfg: RunConfig, n_pairs: int) -> int:
    per_epoch = n_pairs // cfg.train.batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_pairs} pairs do not fill one batch of train.batch_size={cfg.train.batch_size}")
    return cfg.train.max_steps or per_epoch * cfg.train.epochs


def train_local(
    cfg: RunConfig, pairs: list[TokenizedPair], policy, reference, pad_id: int,
    on_log: Callable[[int, dict], None] | None = None,
) -> list[dict]:  # fmt: skip
    """Train in this process; returns the metrics of every optimizer step (floats)."""
    seed_everything(cfg.train.seed)
    policy.train()
    steps = total_steps(cfg, len(pairs))
    opt = build_optimizer(policy.parameters(), cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps)
    history: list[dict] = []
    epoch = 0
    while len(history) < steps:
        for group in epoch_batches(pairs, cfg.train.batch_size, cfg.train.seed, epoch, cfg.train.shuffle):
            metrics = train_step(
                policy, reference, collate(group, pad_id), cfg.loss, cfg.train.grad_accum_steps
            )
            if not torch.isfinite(metrics["loss"]):
                raise FloatingPointError(
                    f"non-finite loss at step {len(history) + 1}; stopping before any update"
                )
            metrics["grad_norm"], metrics["learning_rate"] = optimizer_step(
                policy, opt, sched, cfg.optim.max_grad_norm
            )
            row = {k: float(v) for k, v in metrics.items()}  # .item(): one host sync per step
            history.append(row)
            if on_log and len(history) % cfg.train.log_every == 0:
                on_log(len(history), row)
            if len(history) >= steps:
                break
        epoch += 1
    return history
