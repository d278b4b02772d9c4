"""Reference log-probs once (`train.precompute_reference`): a Ray Data actor-pool stage ahead of
training, cached on disk, so training keeps only the policy in memory.

The stage scores every tokenized pair with the reference model (`ops.logprobs.pair_logps`, two rows
per pair, no gradients) and stores the pairs with two more columns, `ref_chosen` and `ref_rejected`
(summed log-probs), as parquet under `<train.output_dir>/.reference-cache/<key>/<split>/`. A small
materialized dataset is scored in the driver process instead (`scoring_workers`: an actor that
imports torch and transformers and loads the model takes seconds to start, longer than such a
dataset takes to score); the same scorer, batches and order, so the same cache. The key
is a sha256 over what decides those numbers: the reference weights (every file's size, and its
bytes below 64 MiB), the tokenizer, the data section of the config, the source's digest and the
eval split's seed. A run or sweep trial with the same key reads the cache instead of scoring again;
a sweep scores once for all its trials (sweep/run.py). The cache is published atomically (a
folder renamed into place), so a stage that dies leaves nothing a later run would trust.

Assumptions:
- The reference is frozen: `model.reference`, or the policy's starting weights (also when a LoRA
  adapter is trained: its base is the reference).
- A materialized dataset is read back from the cache in its own order (each row's position is
  stored with it), so a run that computes the cache, a run that reuses it and a run with a live
  reference train on the same sequence of batches. A streamed one has no fixed order to keep.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data.dataset import MaterializedDataset

from raydpo.config import RunConfig
from raydpo.data.tokenize import TokenizedPair, collate, pad_token_id
from raydpo.engine.checkpointing import HASHED_BELOW, _sha256
from raydpo.models.loading import load_reference, load_tokenizer
from raydpo.models.paths import local_model_dir, weight_bytes
from raydpo.models.tiny import builtin_model_dir
from raydpo.ops.logprobs import pair_logps
from raydpo.tracking import dataset_digest

CACHE_VERSION = 2  # 2: rows carry their position
COLUMNS = ("ref_chosen", "ref_rejected")
POSITION = "_position"  # a row's place in the scored dataset, in the cache files only
BATCH = 16  # pairs per forward pass of the scorer
# `train.reference_workers: auto` scores in the driver when the reference's weight bytes × the tokens
# to score (rows × 2 × data.max_length) is at most this (the tests' tiny Llama on 64 pairs of 48
# tokens: 3.6e9; `raydpo bench`'s 4.7M-parameter model on 192 pairs of 512: 3.7e12). 1e11 is about
# a second of forward passes on this project's 2-core machine, against 5-9 s for a scoring actor to
# start.
SMALL_SCORING = 1e11


def _files_digest(h, name: str) -> None:
    path = Path(name)
    if not path.is_dir():  # a hub name or builtin: its name (a hub snapshot is immutable per revision)
        h.update(f"name:{name}".encode())
        return
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        size = f.stat().st_size
        content = _sha256(f) if size < HASHED_BELOW else f"{f.stat().st_mtime_ns}"
        h.update(f"{f.relative_to(path)}:{size}:{content}\n".encode())


def cache_key(cfg: RunConfig) -> str:
    """sha256 (first 20 hex digits) of the reference weights, tokenizer, data settings and source."""
    m, d = cfg.model, cfg.data
    h = hashlib.sha256(f"raydpo reference cache v{CACHE_VERSION}\n".encode())
    _files_digest(h, m.reference or m.policy)
    _files_digest(h, m.tokenizer or m.policy)
    settings = {
        "model": {"dtype": m.dtype, "attn": m.attn_implementation, "reference": m.reference or m.policy},
        "data": d.model_dump(mode="json", exclude={"tokenize_workers", "quarantine_path"}),
        "eval_split_seed": cfg.train.seed if d.eval_fraction and not d.eval_source else None,
        "sources": [dataset_digest(s) for s in (d.source, d.eval_source) if s],
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:20]


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / ".reference-cache" / cache_key(cfg)


class ScoreReference:
    """Ray Data actor (or, `threads` None, a plain object in the driver): loads the reference once,
    adds `ref_chosen` / `ref_rejected` to each batch."""

    def __init__(self, run_config: dict, threads: int | None = None):
        cfg = RunConfig.model_validate(run_config)
        if threads is not None:  # an actor's own process; the driver keeps its torch settings
            torch.set_num_threads(max(1, threads))
        model_cfg = cfg.model.model_copy(update={"lora": None})  # a LoRA run's reference is its base
        self.model = load_reference(model_cfg)
        self.pad_id = pad_token_id(load_tokenizer(cfg.model))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chosen, rejected = self.score(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
        return {**batch, "ref_chosen": chosen, "ref_rejected": rejected}

    def score(self, prompts, chosen, rejected) -> tuple[np.ndarray, np.ndarray]:
        """Summed reference log-probs of each pair's chosen and rejected response, (B,) each."""
        pairs = [TokenizedPair(list(p), list(c), list(r)) for p, c, r in zip(prompts, chosen, rejected)]
        with torch.no_grad():
            logps = pair_logps(self.model, collate(pairs, self.pad_id)).sum.double().numpy()  # (2B,)
        return logps[: len(pairs)], logps[len(pairs) :]


def scoring_workers(cfg: RunConfig, datasets: dict, stream: bool) -> int:
    """Actors of the scoring stage, 0 for the driver (`train.reference_workers`). A streamed dataset
    always takes at least one actor; `auto`: the driver when the work (SMALL_SCORING) is small."""
    w = cfg.train.reference_workers
    if stream:
        return max(1, 1 if w == "auto" else w)
    if w != "auto":
        return w
    name = cfg.model.reference or cfg.model.policy
    folder = (
        builtin_model_dir(name) if name.startswith("builtin:") else local_model_dir(name, "model.reference")
    )
    if folder is None:  # a hub name: its size is not known here
        return 1
    tokens = sum(ds.count() for ds in datasets.values()) * 2 * cfg.data.max_length  # an upper bound
    return 0 if weight_bytes(folder) * tokens <= SMALL_SCORING else 1


def attach(cfg: RunConfig, datasets: dict, log, stream: bool = False) -> tuple[dict, str]:
    """`datasets` ({"train": Dataset, "eval": Dataset?}) with the reference columns, read from the
    cache (computed first if missing), materialized or (`stream`) as a stream over the parquet files.
    Returns them and "computed <key>" or "reused <key>"."""
    root = cache_dir(cfg)
    key = root.name
    outcome = "reused"
    if not (root / "done.json").is_file():
        outcome = "computed"
        tmp = root.with_name(f"{key}.tmp-{time.time_ns()}")
        t0 = time.monotonic()
        workers = scoring_workers(cfg, datasets, stream)
        run_config = cfg.model_dump(mode="json")
        if workers == 0:
            scorer = ScoreReference(run_config)
            for split, ds in datasets.items():
                score_here(ds, tmp / split, scorer)
            del scorer
        else:
            threads = max(1, int(ray.available_resources().get("CPU", 1)) // workers)
            for split, ds in datasets.items():
                write_in_order(
                    ds, tmp / split, ScoreReference,
                    fn_constructor_kwargs={"run_config": run_config, "threads": threads},
                    compute=ray.data.ActorPoolStrategy(size=workers), batch_size=BATCH, batch_format="numpy",
                    num_cpus=threads,
                )  # fmt: skip
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in tmp.glob("*/*.parquet"))  # the files'
        #   metadata: a streamed `ds` is not read a second time
        (tmp / "done.json").write_text(json.dumps({"key": key, "rows": rows, "splits": sorted(datasets),
                                                   "seconds": round(time.monotonic() - t0, 2),
                                                   "workers": workers}))  # fmt: skip
        if root.exists():  # a half-written cache of an earlier attempt (no done.json)
            shutil.rmtree(root)
        tmp.rename(root)
        took = time.monotonic() - t0
        where = "in this process" if workers == 0 else f"by {workers} Ray Data actor(s)"
        log(f"reference log-probs: computed for {rows} rows in {took:.1f} s ({where}), cached in {root}")
    else:
        log(f"reference log-probs: reused from {root}")
    out = {split: _read(root / split, stream) for split in datasets}
    return out, f"{outcome} {key}"


def score_here(ds, folder: Path, scorer: ScoreReference) -> None:
    """`scorer` over a materialized `ds` in this process, in the order a training worker iterates it
    (as `write_in_order` keeps it), batches of BATCH rows; one parquet file in `folder`."""
    ctx = ds.context.execution_options
    ordered, ctx.preserve_order = ctx.preserve_order, True
    tables = []
    try:
        for t in ds.iter_batches(batch_size=BATCH, batch_format="pyarrow"):
            cols = [t.column(c).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
            chosen, rejected = scorer.score(*cols)
            tables.append(
                t.append_column(COLUMNS[0], pa.array(chosen)).append_column(COLUMNS[1], pa.array(rejected))
            )
    finally:
        ctx.preserve_order = ordered
    folder.mkdir(parents=True)
    if tables:
        pq.write_table(pa.concat_tables(tables), folder / "scored.parquet")


def write_in_order(ds, folder: Path, fn, **map_kwargs) -> None:
    """`ds.map_batches(fn, **map_kwargs)` written as parquet to `folder`, readable in `ds`'s order by
    `_read`. An actor pool hands back batches as they finish, and Ray Data's `preserve_order` does not
    hold through an actor stage and a write (rows of one block came back swapped), so a materialized
    `ds` gets each row's position as a column (read in the driver, block by block, in the order a
    training worker iterates it) and `_read` sorts by it. A streamed `ds` is written as it comes: each
    worker streams its own shard, in no fixed order (docs/architecture.md)."""
    if isinstance(ds, MaterializedDataset):
        tables, start = [], 0
        ctx = ds.context.execution_options  # a Dataset runs under the DataContext it was made with
        ordered, ctx.preserve_order = ctx.preserve_order, True  # as Ray Train's workers iterate it
        try:
            for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                tables.append(
                    t.append_column(POSITION, pa.array(range(start, start + t.num_rows), pa.int64()))
                )
                start += t.num_rows
        finally:
            ctx.preserve_order = ordered
        ds = ray.data.from_arrow(tables) if tables else ds
    ds.map_batches(fn, **map_kwargs).write_parquet(str(folder))


def _read(folder: Path, stream: bool = False):
    """The cached rows: in the order of the dataset they were scored from (by POSITION, then dropped)
    and materialized, or (`stream`) as a stream over the parquet files."""
    files = sorted(str(f) for f in folder.glob("*.parquet"))
    if stream:
        ds = ray.data.read_parquet(files)
        return ds.drop_columns([POSITION]) if POSITION in ds.schema().names else ds
    table = pa.concat_tables([pq.read_table(f) for f in files])
    if POSITION in table.column_names:
        table = table.sort_by(POSITION).drop_columns([POSITION])
    return ray.data.from_arrow(table).materialize()
