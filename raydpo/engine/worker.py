"""The Ray Train side of a worker: build a `WorkerContext` from Ray Train and run the one loop.

Data: every worker streams the whole training Dataset in the same seeded order and keeps its own
slice of each global batch (rows rank·B … rank·B+B of B·W). Each optimizer step therefore sees the
same B·W pairs whatever W is: 2 workers × batch 4 follow the curve of 1 worker × batch 8. A streamed
run (`data.streaming`, `split_data`) instead gets its own equal shard from Ray Train
(`streaming_split`): every pair is read once per epoch, by one worker, and the curves of 1 × 8 and
2 × 4 agree in distribution, not step for step.
Ray Train touchpoints: get_context, get_dataset_shard (split only; otherwise the iterators come in the
loop config, launch.worker_data), get_checkpoint, report.
"""

from __future__ import annotations

import random
import sys
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import ray.train
import torch
from ray.data import DataContext

from raydpo.config import RunConfig
from raydpo.data.tokenize import Layout, TokenizedPair, collate_batch
from raydpo.engine import distributed as dist_utils
from raydpo.engine.checkpointing import usable
from raydpo.engine.loop import Trainer, WorkerContext
from raydpo.engine.progress import fetch, sender
from raydpo.engine.reference import COLUMNS as REF_COLUMNS
from raydpo.engine.session import take_cpu_back
from raydpo.engine.sources import (
    GROUP_WINDOW,
    PromptSource,
    epoch_seed,
    grouped_batches,
    micro_batch_order,
    pair_length,
    to_device,
)
from raydpo.tracking import RunLogger

SHUFFLE_BUFFER = 20_000  # pairs held for the seeded per-epoch shuffle


def make_collate(rank: int, per_worker: int, pad_id: int, layout: Layout, groups: int = 1):
    """collate_fn for iter_torch_batches: this rank's slice of a global batch → padded tensors (`groups`:
    gradient-accumulation micro-batches, cut from the slice's pairs sorted by width
    (`sources.micro_batch_order`); a packed layout packs them apart)."""

    def fn(batch: dict) -> dict:
        lo, hi = rank * per_worker, (rank + 1) * per_worker
        pairs = [
            TokenizedPair(list(p), list(c), list(r))
            for p, c, r in zip(
                batch["prompt_ids"][lo:hi], batch["chosen_ids"][lo:hi], batch["rejected_ids"][lo:hi]
            )
        ]
        order = micro_batch_order(pairs, groups, layout)  # pair ids and reference columns follow
        pairs = [pairs[i] for i in order]
        ids = [batch["id"][lo + i] for i in order] if "id" in batch else []
        ids = [None if i is None else str(i) for i in ids]
        ref = {k: torch.as_tensor(batch[k][lo:hi][order], dtype=torch.float32)
               for k in REF_COLUMNS if k in batch}  # fmt: skip
        return {**collate_batch(pairs, pad_id, layout, groups), **ref, "ids": ids}

    return fn


class ShardSource:
    """A Ray Data shard: this worker's slice of every global batch, in a seeded per-epoch order; with
    `group_by_length`, each window of GROUP_WINDOW global batches regrouped by length
    (`sources.grouped_batches`: every worker regroups the same window the same way)."""

    def __init__(
        self, shard, batch_size: int, seed: int, rank: int, world: int, pad_id: int, layout: Layout, device,
        group_by_length: bool = False, groups: int = 1,
    ):  # fmt: skip
        self.shard, self.batch_size, self.seed, self.world = shard, batch_size, seed, world
        self.device, self.group = device, group_by_length
        self.collate = make_collate(rank, batch_size, pad_id, layout, groups)

    def epoch(self, epoch: int, shuffle: bool = True):
        global_batch = self.batch_size * self.world
        order = {"local_shuffle_buffer_size": SHUFFLE_BUFFER if shuffle else None,
                 "local_shuffle_seed": epoch_seed(self.seed, epoch) if shuffle else None}  # fmt: skip
        if not self.group:
            it = self.shard.iter_torch_batches(batch_size=global_batch, drop_last=True, device="cpu",
                                               collate_fn=self.collate, **order)  # fmt: skip
            for batch in pull_ahead(it):
                yield to_device(batch, self.device)
            return
        rng = random.Random(epoch_seed(self.seed, epoch))
        windows = self.shard.iter_batches(
            batch_size=global_batch * GROUP_WINDOW, batch_format="numpy", **order
        )
        for w in windows:
            lengths = [pair_length(*p) for p in zip(w["prompt_ids"], w["chosen_ids"], w["rejected_ids"])]
            for rows in grouped_batches(lengths, global_batch, rng):
                yield to_device(self.collate({k: v[rows] for k, v in w.items()}), self.device)


PULL_BATCHES = 64  # batches taken from Ray Data at a time, at most (pull_ahead)
PULL_BYTES = 64 << 20  # and at most this many bytes of tensors


def pull_ahead(batches: Iterator[dict], most: int = PULL_BATCHES, most_bytes: int = PULL_BYTES):
    """Yield `batches` in order, taken from the iterator in runs of `most` batches (fewer when a run's
    tensors pass `most_bytes`). Ray Data prepares the next batch in background threads of this process;
    taken one at a time, that work (Python, holding the GIL) runs during every step and slowed steps by
    a fifth on 2 CPU cores (the bench's short shape). Taken in runs, it runs between them. The first
    run is one batch, so step 1 does not wait for the others."""
    it, size = iter(batches), 1
    while True:
        run, held = [], 0
        for batch in it:
            run.append(batch)
            held += sum(v.nbytes for v in batch.values() if isinstance(v, torch.Tensor))
            if len(run) >= size or held >= most_bytes:
                break
        if not run:
            return
        yield from run
        size = most


def report(metrics: dict, ckpt_fn=None) -> None:
    """ray.train.report on every worker; with `ckpt_fn(dir) -> path | None` (None on ranks that write
    nothing) the checkpoint is written into a temp dir that Ray copies to the run's storage."""
    if ckpt_fn is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = ckpt_fn(Path(tmp) / "checkpoint")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)) if path else None)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point: config["ref"] holds the run config, the Method record and the driver's
    handles (launch.fit)."""
    take_cpu_back()  # a local Ray runs under SCHED_BATCH (engine.session.ray_below_training)
    config = ray.get(config["ref"])
    if config.get("inputs_later"):  # the driver prepared the data while Ray Train started (launch.run)
        inputs = fetch(config["progress"])
        if inputs is None:  # the driver stopped before training; it raises its own error
            return
        config = {**config, **inputs}
    if config.get("data_context") is not None:  # what Ray Train's DatasetsCallback would propagate
        DataContext._set_current(config["data_context"])
    cfg, method = RunConfig.model_validate(config["run_config"]), config["method"]
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker or 1)))  # as many as Ray reserved
    rtx = ray.train.get_context()
    rank, world = rtx.get_world_rank(), rtx.get_world_size()

    def sources(device, layout):
        if method.data == "prompts":
            return PromptSource(config["prompts"], cfg.ppo.rollout_batch_size, config["steps_per_epoch"],
                                cfg.train.seed, rank, world), None  # fmt: skip
        t = cfg.train
        r, w = (0, 1) if config.get("split_data") else (rank, world)  # a split shard is this worker's alone
        shards = config.get("shards")  # not split: the whole dataset's iterators (launch.worker_data)
        shard = lambda name: shards[name] if shards is not None else ray.train.get_dataset_shard(name)  # noqa: E731
        make = lambda name, group, parts: ShardSource(  # noqa: E731
            shard(name), t.batch_size, t.seed, r, w, config["pad_id"], layout, device, group, parts,
        )  # fmt: skip
        train = make("train", t.group_by_length, t.grad_accum_steps)
        return train, (make("eval", False, 1) if config["has_eval"] else None)

    channel = config.get("progress")  # (channel actor, run tag): engine.progress.Progress.channel
    spool = Path(cfg.run_dir) / "mlflow-spool.jsonl"  # on the run's disk: survives restarts of this worker
    logger = RunLogger(config["tracking_uri"], config["mlflow_run_id"], spool) if rank == 0 else None
    if logger:
        logger.start_system_metrics(cfg.tracking.system_metrics_s)  # this worker's machine and process
    ctx = WorkerContext(
        rank=rank, world=world, prepare=lambda p, r: dist_utils.prepare(p, r, cfg.scaling), sources=sources,
        report=report, logger=logger, progress=sender(channel) if channel is not None and rank == 0 else None,
        reference_in_data=config.get("reference_in_data", False),
    )  # fmt: skip
    trainer = Trainer(cfg, method, ctx, config["total_steps"], config["mlflow_run_id"])
    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt else nullcontext() as d:  # a remote checkpoint is downloaded here
        ctx.checkpoint = usable(Path(d), log=lambda m: print(m, file=sys.stderr)) if d else None
        pos = trainer.setup()
    trainer.train(pos)
    trainer.cleanup()
