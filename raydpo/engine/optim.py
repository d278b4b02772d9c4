"""Optimizer, warm-up schedule, clipping and seeding: the pieces every method's updates share."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from raydpo.config import OptimConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.RMSprop(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of cfg.lr for training step `step` (0-based): linear warm-up, then the schedule."""
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
    """Stepped once per training step (PPO's several minibatch updates of one step share its rate)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))


def clip_gradients(policy, max_grad_norm: float | None) -> torch.Tensor:
    """The pre-clip global gradient norm (0-d, no host sync), after clipping to `max_grad_norm`.
    Under FSDP2 the norm is over the full model (a DTensor made whole)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach()
