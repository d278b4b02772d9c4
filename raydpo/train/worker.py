"""The Ray Train loop, one per worker. It only wires things: prepare, iterate, step, report.

Data: every worker streams the whole training Dataset in the same seeded order and keeps its own
slice of each global batch (rows rank·B … rank·B+B of B·W). Each optimizer step therefore sees the
same B·W pairs whatever W is: 2 workers × batch 4 follow the curve of 1 worker × batch 8.
Ray Train touchpoints: get_context, get_dataset_shard, get_checkpoint, report.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import torch

from raydpo.config import RunConfig
from raydpo.data.tokenize import TokenizedPair, collate
from raydpo.train import distributed as dist_utils
from raydpo.train.checkpointing import load_trainer_state, save_checkpoint, set_rng_state
from raydpo.train.loop import build_optimizer, build_scheduler, optimizer_step, seed_everything
from raydpo.train.objectives import make_objective
from raydpo.train.step import needs_reference, train_step

SHUFFLE_BUFFER = 20_000  # pairs held for the seeded per-epoch shuffle


def make_collate(rank: int, per_worker: int, pad_id: int, chosen_only: bool = False):
    """collate_fn for iter_torch_batches: this rank's slice of a global batch → padded tensors."""

    def fn(batch: dict) -> dict:
        lo, hi = rank * per_worker, (rank + 1) * per_worker
        pairs = [
            TokenizedPair(list(p), list(c), list(r))
            for p, c, r in zip(
                batch["prompt_ids"][lo:hi], batch["chosen_ids"][lo:hi], batch["rejected_ids"][lo:hi]
            )
        ]
        return collate(pairs, pad_id, chosen_only=chosen_only)

    return fn


def epoch_batches(
    shard, cfg: RunConfig, epoch: int, rank: int, world: int, pad_id: int, device, shuffle=None
):
    """This worker's batches for one epoch (full global batches only), seeded per epoch."""
    shuffle = cfg.train.shuffle if shuffle is None else shuffle
    it = shard.iter_torch_batches(
        batch_size=cfg.train.batch_size * world, drop_last=True, device="cpu",
        collate_fn=make_collate(rank, cfg.train.batch_size, pad_id, cfg.method in ("sft", "preferred_ft")),
        local_shuffle_buffer_size=SHUFFLE_BUFFER if shuffle else None,
        local_shuffle_seed=cfg.train.seed * 1_000_003 + epoch if shuffle else None,
    )  # fmt: skip
    for batch in it:
        yield {k: v.to(device) for k, v in batch.items()}


def _restore(cfg: RunConfig, ckpt):
    """(policy, trainer state or None) from the latest Ray checkpoint, else a fresh policy."""
    from raydpo.modeling import load_policy, load_reward_model

    load = load_reward_model if cfg.method == "reward_model" else load_policy
    if ckpt is None:
        return load(cfg.model), None
    with ckpt.as_directory() as d:
        state = load_trainer_state(Path(d))
        return load(cfg.model, checkpoint=Path(d) / "model"), state


def report(metrics: dict, ckpt_fn=None) -> None:
    """ray.train.report on every worker; with `ckpt_fn(dir) -> path | None` (None on ranks that write
    nothing) the checkpoint is written into a temp dir that Ray copies to the run's storage."""
    import ray.train

    if ckpt_fn is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = ckpt_fn(Path(tmp) / "checkpoint")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)) if path else None)


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from raydpo.modeling import load_reference
    from raydpo.tracking import RunLogger

    cfg = RunConfig.model_validate(config["run_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.train.seed)
    policy, state = _restore(cfg, ray.train.get_checkpoint())
    reference = load_reference(cfg.model) if cfg.method == "dpo" and needs_reference(cfg.loss) else None
    policy, reference, device = dist_utils.prepare(policy, reference, cfg.scaling)
    opt = build_optimizer(policy.parameters(), cfg.optim)
    sched = build_scheduler(opt, cfg.optim, config["total_steps"])
    pos = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if state is not None:
        dist_utils.load_optimizer_state(policy, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        pos = {k: state[k] for k in pos}
    logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 else None
    loop = _Loop(cfg, config, policy, reference, opt, sched, device, rank, world, logger)
    loop.run(pos)
    if rank == 0 and logger:
        logger.finish()


class _Loop:
    """The step loop with its bookkeeping (positions, throughput, logging, checkpoints)."""

    def __init__(self, cfg, config, policy, reference, opt, sched, device, rank, world, logger):
        import ray.train

        self.cfg, self.config, self.policy, self.reference = cfg, config, policy, reference
        self.opt, self.sched, self.device, self.rank, self.world, self.logger = (
            opt,
            sched,
            device,
            rank,
            world,
            logger,
        )
        self.shard = ray.train.get_dataset_shard("train")
        self.eval_shard = ray.train.get_dataset_shard("eval") if config.get("has_eval") else None
        self.progress = config.get("progress")
        self.pending: list[tuple[int, dict]] = []
        self.last_eval: dict[str, float] = {}
        self.autocast = dist_utils.autocast(cfg.scaling, device)
        self.objective = make_objective(cfg)

    def run(self, pos: dict) -> None:
        total, cfg = self.config["total_steps"], self.cfg
        if (
            self.eval_shard is not None and cfg.train.eval_every
        ):  # a baseline, and a value for Tune from step 1
            self.last_eval = self.evaluate()
            if pos["step"] == 0:
                self.pending.append((0, dict(self.last_eval)))
        self.policy.train()
        while pos["step"] < total:
            skip = pos["batch_in_epoch"]  # resume mid-epoch: skip the batches already trained on
            batches = epoch_batches(
                self.shard, cfg, pos["epoch"], self.rank, self.world, self.config["pad_id"], self.device
            )
            t0, tokens = time.perf_counter(), 0
            for k, batch in enumerate(batches):
                if k < skip:
                    continue
                tokens += int(batch["attention_mask"].sum())
                metrics = self.step(batch)
                pos = {"step": pos["step"] + 1, "epoch": pos["epoch"], "batch_in_epoch": k + 1}
                self.after_step(pos, metrics, time.perf_counter() - t0, tokens)
                t0, tokens = time.perf_counter(), 0
                if pos["step"] >= total:
                    break
            else:
                pos = {"step": pos["step"], "epoch": pos["epoch"] + 1, "batch_in_epoch": 0}

    def step(self, batch: dict) -> dict:
        sync = dist_utils.no_sync_factory(self.policy)
        with self.autocast:
            metrics = train_step(
                self.policy, self.reference, batch, self.objective, self.cfg.train.grad_accum_steps, sync
            )
        metrics = dist_utils.mean_across_workers(metrics)  # one all-reduce + one host sync per step
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss ({metrics['loss']}); stopping before the update")
        norm, lr = optimizer_step(self.policy, self.opt, self.sched, self.cfg.optim.max_grad_norm)
        metrics["grad_norm"], metrics["learning_rate"] = float(norm), lr
        return metrics

    def after_step(self, pos: dict, metrics: dict, seconds: float, tokens: int) -> None:
        step, cfg = pos["step"], self.cfg
        metrics["pairs_per_second"] = cfg.train.batch_size * self.world / max(seconds, 1e-9)
        metrics["tokens_per_second"] = tokens * self.world / max(seconds, 1e-9)
        evaluated = bool(
            cfg.train.eval_every and self.eval_shard is not None and step % cfg.train.eval_every == 0
        )
        if evaluated:
            self.last_eval = self.evaluate()
            metrics.update(self.last_eval)
        row = {"step": step, **self.last_eval, **metrics}  # Tune sees the latest eval metrics every time
        _maybe_fault(step, self.config)
        last = step == self.config["total_steps"]
        if step % cfg.train.log_every == 0 or last or evaluated:  # eval results are always logged
            self.pending.append((step, metrics))
            if self.progress is not None and self.rank == 0:
                self.progress.put_nowait({"step": step, **metrics})
        checkpointing = bool(cfg.train.checkpoint_every)
        if (checkpointing and step % cfg.train.checkpoint_every == 0) or last:
            report(row, lambda p: self.checkpoint(p, pos))
            self.flush()
        elif step % cfg.train.log_every == 0:
            report(row)
            if not checkpointing:
                self.flush()

    def flush(self) -> None:
        """Send buffered step metrics to MLflow. With checkpoints, only steps a checkpoint covers are
        sent, so a run resumed after a failure never logs the same step twice."""
        if self.logger:
            for step, m in self.pending:
                self.logger.log_metrics(m, step)
        self.pending = []

    def checkpoint(self, path: Path, pos: dict) -> Path | None:
        model_state, optim_state = dist_utils.full_states(self.policy, self.opt)  # collective: all ranks
        if self.rank != 0:
            return None
        position = {**pos, "mlflow_run_id": self.config["mlflow_run_id"] or ""}
        return save_checkpoint(
            path, dist_utils.unwrap(self.policy), model_state, optim_state, self.sched, position
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.policy.eval()
        sums: dict[str, torch.Tensor] = {}
        n = 0
        batches = epoch_batches(
            self.eval_shard,
            self.cfg,
            0,
            self.rank,
            self.world,
            self.config["pad_id"],
            self.device,
            shuffle=False,
        )
        for batch in batches:
            with self.autocast:
                _, m = self.objective(self.policy, self.reference, batch)
            for k, v in m.items():
                sums[k] = sums.get(k, 0) + v
            n += 1
        self.policy.train()
        if n == 0:
            return {}
        means = dist_utils.mean_across_workers({k: v / n for k, v in sums.items()})
        return {f"eval/{k}": v for k, v in means.items()}


def _maybe_fault(step: int, config: dict) -> None:
    """Fault injection for the resume tests: RAYDPO_FAULT_AT_STEP=N and RAYDPO_FAULT_MARKER=FILE on
    the driver make a worker fail once after step N (before that step is logged or checkpointed)."""
    target, marker = config.get("fault_at_step"), config.get("fault_marker")
    if target and int(target) == step and marker and not Path(marker).exists():
        Path(marker).write_text("fired")
        raise RuntimeError(f"injected fault after step {step}")
