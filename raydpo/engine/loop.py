"""The one training loop: every method, on a Ray Train worker or in a single process.

Its shape is torchtune's recipe shape: `setup` (models, optimizer, resumed state), `train` (the steps),
`save_checkpoint`, `cleanup`. What differs between Ray and one process comes in a `WorkerContext`
(engine/worker.py builds it from Ray Train, engine/local.py without Ray); what differs between
methods comes in a `Method` (engine/method.py, registry in raydpo/methods).

Assumptions:
- Every worker holds the whole model (DDP) or its shard (FSDP2) and sees different batches of the
  same global batch; metrics are averaged over workers with one all-reduce per update.
- A step is one batch: one optimizer update, or, with a rollout phase, one update per minibatch the
  rollout returns. The learning-rate schedule advances once per step.
- A non-finite loss or gradient norm stops the run before the update that would use it, naming
  the step and the batch's pair ids (or, with `train.skip_nonfinite`, the update is skipped and
  counted), so no checkpoint holds non-finite weights.
- Metrics reach MLflow through a spool on the run's disk (tracking.MetricSpool): a store that is down
  delays them and never stops training, and steps that a resumed run replays are not sent twice.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from raydpo.config import RunConfig
from raydpo.engine import distributed as dist_utils
from raydpo.engine.checkpointing import load_checkpoint, save_checkpoint, set_rng_state
from raydpo.engine.method import Method
from raydpo.engine.optim import build_optimizer, build_scheduler, clip_gradients, seed_everything
from raydpo.engine.step import train_step
from raydpo.models.loading import load_reference
from raydpo.ops.logprobs import shared_prefix_fallback
from raydpo.tracking import RunLogger


@dataclass
class WorkerContext:
    """What differs between a Ray Train worker and a single process."""

    rank: int
    world: int
    prepare: Callable  # (policy, reference) -> (policy, reference, device): DDP/FSDP2 wrap, or .to(device)
    sources: Callable  # (device) -> (train BatchSource, eval BatchSource or None)
    report: Callable  # (metrics row, checkpoint writer or None) -> None: ray.train.report, or local
    checkpoint: Path | None = None  # checkpoint directory to resume from
    logger: RunLogger | None = None  # rank 0's MLflow run
    progress: Callable[[dict], None] | None = None  # rank 0's live progress lines
    models: tuple | None = None  # (policy, reference) already loaded (single-process tests), else loaded here
    reference_in_data: bool = False  # batches carry reference log-probs (engine/reference.py): none loaded


class Trainer:
    def __init__(
        self, cfg: RunConfig, method: Method, ctx: WorkerContext, total_steps: int, run_id: str | None
    ):
        self.cfg, self.method, self.ctx, self.total, self.run_id = cfg, method, ctx, total_steps, run_id
        self.rank, self.world = ctx.rank, ctx.world
        self.last_eval: dict[str, float] = {}
        self.history: list[dict] = []
        self.skipped = 0  # updates skipped for a non-finite loss or gradient (train.skip_nonfinite)

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> dict:
        """Models, optimizer, schedule and rollout, restored from the context's checkpoint if any.
        Returns the data position to start from."""
        cfg, method = self.cfg, self.method
        seed_everything(cfg.train.seed)
        state, model_dir = load_checkpoint(self.ctx.checkpoint) if self.ctx.checkpoint else (None, None)
        if self.ctx.models is not None:
            policy, reference = self.ctx.models
        else:
            policy = method.load_model(cfg, model_dir)
            wanted = method.uses_reference(cfg) and not self.ctx.reference_in_data
            reference = load_reference(cfg.model) if wanted else None
        self.policy, self.reference, self.device = self.ctx.prepare(policy, reference)
        self.opt = build_optimizer(self.policy.parameters(), cfg.optim)
        self.sched = build_scheduler(self.opt, cfg.optim, self.total)
        self.objective = method.objective(cfg)
        self.rollout = (
            method.rollout(cfg, self.policy, self.reference, self.device, self.rank, self.world)
            if method.rollout else None
        )  # fmt: skip
        self.layout = self.batch_layout(policy, reference)
        self.train_source, self.eval_source = self.ctx.sources(self.device, self.layout)
        self.autocast = dist_utils.autocast(cfg.scaling, self.device)
        pos = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        if state is not None:
            dist_utils.load_optimizer_state(self.policy, self.opt, state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            if self.rollout is not None:
                self.rollout.load_state_dict(state["method"])
            self.skipped = state.get("nonfinite_skipped", 0)
            pos = {k: state[k] for k in pos}
        return pos

    def batch_layout(self, policy, reference) -> str:
        """How pairs are collated (data.tokenize.collate_batch): one row per pair where the objective
        and the models take it (`train.prefix_sharing`; several pairs per row with `train.packing`),
        else two; single rows for text methods."""
        objective, cfg = self.objective, self.cfg
        if not objective.paired:
            return "texts"
        if not (objective.shared_prefix and cfg.train.prefix_sharing):
            return "pairs"
        why = shared_prefix_fallback((policy, reference), cfg.data.max_length)
        if why is not None:
            if self.rank == 0:
                print(f"raydpo: two rows per pair (no prefix sharing): {why}", file=sys.stderr, flush=True)
            return "pairs"
        return "packed" if cfg.train.packing else "shared"

    # ------------------------------------------------------------------------------------- train
    def train(self, pos: dict) -> list[dict]:
        cfg = self.cfg
        if (
            self.eval_source is not None and cfg.train.eval_every
        ):  # a baseline, and a value for Tune from step 1
            self.last_eval = self.evaluate()
            if pos["step"] == 0:
                self.log(0, dict(self.last_eval))
        self.policy.train()
        while pos["step"] < self.total:
            skip = pos["batch_in_epoch"]  # resume mid-epoch: skip the batches already trained on
            t0, tokens = time.perf_counter(), 0
            for k, batch in enumerate(self.train_source.epoch(pos["epoch"], cfg.train.shuffle)):
                if k < skip:
                    continue
                if isinstance(batch, dict):
                    tokens += int(batch["attention_mask"].sum())
                metrics = self.step(batch, pos["step"] + 1)
                pos = {"step": pos["step"] + 1, "epoch": pos["epoch"], "batch_in_epoch": k + 1}
                self.after_step(pos, metrics, time.perf_counter() - t0, tokens)
                t0, tokens = time.perf_counter(), 0
                if pos["step"] >= self.total:
                    break
            else:
                pos = {"step": pos["step"], "epoch": pos["epoch"] + 1, "batch_in_epoch": 0}
        return self.history

    def step(self, batch, step: int) -> dict[str, float]:
        """One training step: [rollout →] forward/backward → all-reduce of metrics → update(s)."""
        ids = batch.pop("ids", None) if isinstance(batch, dict) else None
        updates, extra = self.rollout(batch, step) if self.rollout else ([batch], {})
        accum = 1 if self.rollout else self.cfg.train.grad_accum_steps
        sync = dist_utils.no_sync_factory(self.policy)
        totals: dict[str, float] = {}
        for mb in updates:
            with self.autocast:
                m = train_step(self.policy, self.reference, mb, self.objective, accum, sync)
            m["grad_norm"] = clip_gradients(self.policy, self.cfg.optim.max_grad_norm)
            m = dist_utils.mean_across_workers(m)  # one all-reduce + one host sync per update
            if math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]):
                self.opt.step()
            else:
                self.nonfinite(m, step, ids)
            self.opt.zero_grad(set_to_none=True)
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v / len(updates)
        if self.cfg.train.skip_nonfinite:
            totals["nonfinite_skipped"] = float(self.skipped)
        totals["learning_rate"] = self.opt.param_groups[0]["lr"]
        self.sched.step()
        if self.rollout:
            totals.update(dist_utils.mean_across_workers(extra))
            self.rollout.update(totals, self.world)
        return totals

    def nonfinite(self, m: dict[str, float], step: int, ids) -> None:
        """A NaN/inf loss or gradient norm: count and skip the update (train.skip_nonfinite), or stop."""
        what = "loss" if not math.isfinite(m["loss"]) else "gradient norm"
        value = m["loss"] if what == "loss" else m["grad_norm"]
        if self.cfg.train.skip_nonfinite:
            self.skipped += 1
            return
        shown = [i for i in (ids or []) if i is not None][:8]
        pairs = f", pairs {', '.join(map(str, shown))}{' …' if len(ids or []) > 8 else ''}" if shown else ""
        raise FloatingPointError(
            f"non-finite {what} ({value}) at step {step}{pairs}; stopped before the update "
            "(train.skip_nonfinite=true skips such batches)"
        )

    def after_step(self, pos: dict, metrics: dict, seconds: float, tokens: int) -> None:
        step, cfg = pos["step"], self.cfg
        per_step = cfg.ppo.rollout_batch_size if self.rollout else cfg.train.batch_size
        metrics["pairs_per_second"] = per_step * self.world / max(seconds, 1e-9)
        if tokens:
            metrics["tokens_per_second"] = tokens * self.world / max(seconds, 1e-9)
        if self.device.type == "cuda":  # the allocator's own count: no device synchronization
            metrics["gpu_memory_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        evaluated = bool(
            cfg.train.eval_every and self.eval_source is not None and step % cfg.train.eval_every == 0
        )
        if evaluated:
            self.last_eval = self.evaluate()
            metrics.update(self.last_eval)
        self.history.append({"step": step, **metrics})
        row = {"step": step, **self.last_eval, **metrics}  # Tune sees the latest eval metrics every time
        last = step == self.total
        if step % cfg.train.log_every == 0 or last or evaluated:  # eval results are always logged
            self.log(step, metrics)
            if self.ctx.progress is not None and self.rank == 0:
                self.ctx.progress({"step": step, **metrics})
        if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or last:
            self.ctx.report(row, lambda path: self.save_checkpoint(path, pos))
        elif step % cfg.train.log_every == 0:
            self.ctx.report(row, None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Rank 0's metrics to MLflow, through the run's spool (tracking.MetricSpool): never blocks on
        the store, and a step that a resumed run replays is not logged a second time."""
        if self.ctx.logger:
            self.ctx.logger.log_metrics(metrics, step)

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: Path, pos: dict) -> Path | None:
        """Write a checkpoint into `path` on rank 0 (gathering full states is a collective: all ranks)."""
        model_state, optim_state = dist_utils.full_states(self.policy, self.opt)
        if self.rank != 0:
            return None
        position = {**pos, "mlflow_run_id": self.run_id or "", "nonfinite_skipped": self.skipped,
                    "method": self.rollout.state_dict() if self.rollout else {}}  # fmt: skip
        return save_checkpoint(
            path, dist_utils.unwrap(self.policy), model_state, optim_state, self.sched, position
        )

    # -------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The objective's metrics averaged over the eval split, as eval/<name>."""
        self.policy.eval()
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for batch in self.eval_source.epoch(0, shuffle=False):
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

    def cleanup(self) -> None:
        """Send what the spool holds and stop the samplers; the driver ends the MLflow run."""
        if self.ctx.logger:
            self.ctx.logger.close()
