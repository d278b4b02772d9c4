"""Streaming check: a generated source of N preference pairs through validate → tokenize → parquet →
Ray Train workers that each read only their own shard, with the peak memory of every process.

    python -m benchmarks.stream --pairs 2000000 [--workers 2] [--dir DIR] [--json FILE]

It runs raydpo's own data path with `data.streaming: on`: `engine.launch.build_datasets` (the Ray
Data actor stage writes the tokenized rows to parquet as it goes) and, in each Ray Train worker,
`engine.worker.ShardSource` over `ray.train.get_dataset_shard` with Ray Train's split, collating
every batch as training does. The workers do not run a model: this measures the data path alone.
A sampler on the driver polls the resident memory of the driver and of every Ray worker process
(by role) and the object store's use every 0.2 s; each training worker also samples its own private
memory (USS, every 0.5 s), which unlike its RSS leaves out the shared object-store pages it has read.
The source is Parquet with row groups of 10,000 pairs, so it is read in pieces (a JSON-lines file is
read whole, see data/pipeline.py).

Prints one line per figure and returns them: pairs seen per worker (each pair once per epoch, by one
worker), peak RSS of the driver, of the tokenize actor and of each training worker (and each worker's
USS when its stream started and at its peak), peak object store use, and the size the tokenized pairs
would take materialized.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import tempfile
import threading
import time
import zlib
from pathlib import Path

import psutil

GROUP = 10_000  # rows per Parquet row group of the generated source


def write_source(path: Path, n: int, seed: int = 0) -> Path:
    """n standard pairs with ids p0 … p{n-1}, as Parquet written in row groups (never all in memory)."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    words = ["good", "bad", "film", "plot", "actor", "scene", "great", "dull", "story", "music"]
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
                        ("rejected", pa.string())])  # fmt: skip
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, n, GROUP):
            ids = range(start, min(n, start + GROUP))
            text = lambda k: " ".join(rng.choice(words) for _ in range(k))
            cols = {"id": [f"p{i}" for i in ids], "prompt": [text(rng.randint(4, 12)) for _ in ids],
                    "chosen": [text(rng.randint(3, 8)) for _ in ids],
                    "rejected": [text(rng.randint(3, 8)) for _ in ids]}  # fmt: skip
            w.write_table(pa.table(cols, schema=schema))
    return path


class PeakSampler:
    """Peak RSS of this process and of Ray's worker processes by role (`ray::<Name>`), and peak object
    store use, sampled every `every` seconds in a daemon thread."""

    def __init__(self, every: float = 0.2):
        self.every, self.peaks, self.store_peak = every, {}, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import ray

        for p in psutil.process_iter(["cmdline", "memory_info"]):
            cmd = p.info["cmdline"] or []
            if not cmd or not p.info["memory_info"]:
                continue
            if cmd[0].startswith("ray::"):
                key = f"{re.sub(r'[.][A-Za-z_]+$', '', cmd[0][5:].split()[0])[:60]} (pid {p.pid})"
                self.peaks[key] = max(self.peaks.get(key, 0), p.info["memory_info"].rss)
        if ray.is_initialized():
            total = ray.cluster_resources().get("object_store_memory", 0)
            free = ray.available_resources().get("object_store_memory", total)
            self.store_peak = max(self.store_peak, total - free)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception:  # a process that ended while it was read
                pass
            self._stop.wait(self.every)


class PrivatePeak:
    """Peak USS (memory private to this process: not the shared object-store pages it has read, which
    its RSS also counts) of this process, and its USS at the start, sampled every `every` s."""

    def __init__(self, every: float = 0.5):
        self.every, self.start_uss = every, psutil.Process().memory_full_info().uss
        self.peak = self.start_uss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = psutil.Process()
        while True:
            self.peak = max(self.peak, me.memory_full_info().uss)
            if self._stop.wait(self.every):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def consume_loop(config: dict) -> None:
    """A Ray Train worker: one epoch over its shard through ShardSource (collated as in training)."""
    import ray.train

    from raydpo.engine.worker import ShardSource

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    src = ShardSource(shard, config["batch_size"], 0, 0, 1, config["pad_id"], "pairs", "cpu")
    pairs, ids_crc, t0 = 0, 0, time.perf_counter()
    seen: set[str] = set() if config["check_ids"] else None
    private = PrivatePeak()
    for batch in src.epoch(0):
        pairs += len(batch["ids"])
        for i in batch["ids"]:
            ids_crc ^= zlib.crc32(i.encode())
            if seen is not None:
                seen.add(i)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"rank": rank, "pairs": pairs, "ids_crc": ids_crc, "seconds": time.perf_counter() - t0,
           "peak_rss": peak, "peak_uss": private.stop(), "start_uss": private.start_uss,
           "ids": sorted(seen) if seen is not None else None}  # fmt: skip
    Path(config["out"], f"worker-{rank}.json").write_text(json.dumps(out))
    ray.train.report({"pairs": pairs})


def run(pairs: int, workers: int = 2, root: Path | None = None, batch_size: int = 8, check_ids: bool = False,
        log=print) -> dict:  # fmt: skip
    """Generate, prepare and stream `pairs` pairs to `workers` Ray Train workers; returns the figures.
    Uses the Ray this process has already started, else starts a local one (engine/session.py)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raydpo.config import build_config
    from raydpo.data.tokenize import pad_token_id
    from raydpo.engine.launch import build_datasets
    from raydpo.engine.session import start_ray
    from raydpo.models.loading import load_tokenizer

    root = Path(root or tempfile.mkdtemp(prefix="raydpo-stream-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    source = write_source(root / "pairs.parquet", pairs)
    mib, took = source.stat().st_size / 2**20, time.perf_counter() - t0
    log(f"source: {pairs} pairs, {mib:.1f} MiB Parquet ({took:.1f} s)")
    cfg = build_config({
        "run_name": "stream", "model": {"policy": "builtin:tiny-llama"},
        "data": {"source": str(source), "streaming": "on", "max_length": 48, "max_prompt_length": 24},
        "train": {"batch_size": batch_size, "output_dir": str(root / "runs")},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1}, "tracking": {"enabled": False},
    })  # fmt: skip
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    start_ray(workers + 1)
    out_dir = root / "workers"
    out_dir.mkdir(exist_ok=True)
    with PeakSampler() as sampler:
        t1 = time.perf_counter()
        train, _, reports = build_datasets(cfg, log)
        prepare_s = time.perf_counter() - t1
        stored = sum(f.stat().st_size for f in (cfg.run_dir / "data").rglob("*.parquet"))
        t2 = time.perf_counter()
        trainer = TorchTrainer(
            consume_loop,
            train_loop_config={"batch_size": batch_size, "pad_id": pad_token_id(load_tokenizer(cfg.model)),
                               "out": str(out_dir), "check_ids": check_ids},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="stream", storage_path=str(root / "ray")),
            datasets={"train": train}, dataset_config=ray.train.DataConfig(datasets_to_split="all"),
        )  # fmt: skip
        trainer.fit()
        stream_s = time.perf_counter() - t2
    per_worker = [json.loads((out_dir / f"worker-{r}.json").read_text()) for r in range(workers)]
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    roles = {k: v for k, v in sampler.peaks.items() if "PreparePairs" in k or "MapBatches" in k}
    figures = {
        "pairs": pairs, "workers": workers, "kept": reports[0].kept,
        "pairs_per_worker": [w["pairs"] for w in per_worker],
        "prepare_s": round(prepare_s, 1), "stream_s": round(stream_s, 1),
        "tokenized_parquet_mib": round(stored / 2**20, 1),
        "driver_peak_rss_mib": round(driver_peak / 2**20),
        "worker_peak_rss_mib": [round(w["peak_rss"] / 2**20) for w in per_worker],
        "worker_peak_uss_mib": [round(w["peak_uss"] / 2**20) for w in per_worker],
        "worker_start_uss_mib": [round(w["start_uss"] / 2**20) for w in per_worker],
        "data_actor_peak_rss_mib": {k: round(v / 2**20) for k, v in sorted(roles.items())},
        "object_store_peak_mib": round(sampler.store_peak / 2**20),
        "ids": [w["ids"] for w in per_worker] if check_ids else None,
    }  # fmt: skip
    log(f"prepared (validate + tokenize → parquet) in {figures['prepare_s']} s: {figures['kept']} kept, "
        f"{figures['tokenized_parquet_mib']} MiB on disk")  # fmt: skip
    log(f"streamed in {figures['stream_s']} s: pairs per worker {figures['pairs_per_worker']}")
    log(f"peak RSS MiB: driver {figures['driver_peak_rss_mib']}, training workers "
        f"{figures['worker_peak_rss_mib']} (private memory, USS: {figures['worker_start_uss_mib']} when the "
        f"stream starts, peak {figures['worker_peak_uss_mib']}), "
        f"data actors {figures['data_actor_peak_rss_mib']}; "
        f"object store peak {figures['object_store_peak_mib']} MiB")  # fmt: skip
    return figures


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--dir", type=Path,
        help="where the source, parquet and Ray storage go and stay (default: a temp dir, removed after)",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    root = a.dir or Path(tempfile.mkdtemp(prefix="raydpo-stream-"))
    try:
        figures = run(a.pairs, a.workers, root)
    finally:
        if a.dir is None:  # at 2 million pairs: ~200 MiB of source and tokenized parquet
            shutil.rmtree(root, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps({k: v for k, v in figures.items() if k != "ids"}, indent=1))


if __name__ == "__main__":
    main()
