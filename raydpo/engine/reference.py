"""Reference log-probs once (`train.precompute_reference`): a Ray Data actor-pool stage ahead of
training, cached on disk, so training keeps only the policy in memory.

The stage scores every tokenized pair with the reference model (`ops.logprobs.pair_logps`, no
gradients) in the run's own fastest exact layout: one `[prompt; chosen; rejected]` row per pair where
`train.prefix_sharing` is on and the model takes it, the LM head on scored positions only with
`train.response_only_logits`, and each batch's pairs cut into micro-batches of SCORE_MICRO sorted by
width (less padding; the results go back to the rows' order). It stores the pairs with two more
columns, `ref_chosen` and `ref_rejected` (summed log-probs), as parquet under
`<train.output_dir>/.reference-cache/<key>/<split>/`. A small materialized dataset is scored in the
driver process instead (`scoring_workers`: an actor that imports torch and transformers and loads the
model takes seconds to start, longer than such a dataset takes to score); the same scorer, batches
and order, so the same cache. The key is a sha256 over what decides those numbers: the reference
weights (every file's size, and its bytes below 64 MiB), the tokenizer, the data section of the
config, the source's digest, the eval split's seed, and the layout and head settings above (they
decide the float rounding). A run or sweep trial with the same key reads the cache instead of
scoring again; a sweep scores once for all its trials (sweep/run.py). The cache is published
atomically (a folder renamed into place), so a stage that dies leaves nothing a later run would
trust.

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
from raydpo.data.tokenize import TokenizedPair, collate_batch, pad_token_id
from raydpo.engine.checkpointing import HASHED_BELOW, _sha256
from raydpo.engine.distributed import use_bf16
from raydpo.engine.sources import row_width, to_device
from raydpo.models.loading import load_reference, load_tokenizer
from raydpo.models.paths import local_model_dir, weight_bytes
from raydpo.models.tiny import builtin_model_dir
from raydpo.ops.logprobs import pair_logps, shared_prefix_fallback
from raydpo.tracking import dataset_digest

CACHE_VERSION = 3  # 2: rows carry their position; 3: scored in the run's layout (prefix sharing, head)
COLUMNS = ("ref_chosen", "ref_rejected")
POSITION = "_position"  # a row's place in the scored dataset, in the cache files only
BATCH = 64  # pairs per call of the scorer (an actor's batch), cut into micro-batches of SCORE_MICRO
SCORE_MICRO = 8  # pairs per forward pass, sorted by width within a BATCH
# `train.reference_workers: auto` scores in the driver when the reference's weight bytes × the tokens
# to score (every pair's prompt, chosen and rejected ids, counted) is at most this, else in one actor.
# `raydpo bench`'s 4.7M-parameter float32 model on its 192 short-prompt pairs: 19 MB × 32k tokens =
# 6.0e11, scored in 2.0-2.4 s on this project's 2-core machine, against 5-9 s for a scoring actor to
# start (import torch and transformers, load the model); 2.5e12 is about 8 s of the driver's forward
# passes. A 0.5B-parameter bf16 model passes it with about 2,500 tokens: real models get an actor.
SMALL_SCORING = 2.5e12


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
        "scoring": {
            "shared": cfg.train.prefix_sharing,
            "response_only": cfg.train.response_only_logits,
            **scoring_precision(cfg),
        },  # fmt: skip
        "data": d.model_dump(mode="json", exclude={"tokenize_workers", "quarantine_path"}),
        "eval_split_seed": cfg.train.seed if d.eval_fraction and not d.eval_source else None,
        "sources": [dataset_digest(s) for s in (d.source, d.eval_source) if s],
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:20]


def scoring_precision(cfg: RunConfig) -> dict:
    """The cache key's part for where and how the scorer computes: nothing for the float32 CPU scoring
    of a CPU run (the keys of such runs stay as they were), else the precision and the device kind."""
    s = cfg.scaling
    if s.precision != "bf16" and not s.use_gpu:
        return {}
    return {"precision": s.precision, "device": "gpu" if s.use_gpu else "cpu"}


def scoring_device(cfg: RunConfig) -> torch.device:
    """A GPU run scores on a GPU (an actor's own, or the driver's first), else on CPUs."""
    return torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.output_dir) / ".reference-cache" / cache_key(cfg)


class ScoreReference:
    """Ray Data actor (or, `threads` None, a plain object in the driver): loads the reference once,
    adds `ref_chosen` / `ref_rejected` to each batch. On the run's device kind (`scoring_device`), under
    the autocast its training step uses (`engine.distributed.use_bf16`), as a live reference would be
    computed: with bf16 a float32 reference beside a bf16 policy would move step 1's loss off ln 2."""

    def __init__(self, run_config: dict, threads: int | None = None):
        cfg = RunConfig.model_validate(run_config)
        if threads is not None:  # an actor's own process; the driver keeps its torch settings
            torch.set_num_threads(max(1, threads))
        model_cfg = cfg.model.model_copy(update={"lora": None})  # a LoRA run's reference is its base
        self.device = scoring_device(cfg)
        self.model = load_reference(model_cfg).to(self.device)
        self.bf16 = use_bf16(cfg.scaling, self.device)
        self.pad_id = pad_token_id(load_tokenizer(cfg.model))
        self.layout = scoring_layout(cfg, self.model)
        self.response_only = cfg.train.response_only_logits

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        chosen, rejected = self.score(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
        return {**batch, "ref_chosen": chosen, "ref_rejected": rejected}

    def score(self, prompts, chosen, rejected) -> tuple[np.ndarray, np.ndarray]:
        """`score_pairs` of a batch's columns."""
        rows = zip(prompts, chosen, rejected)
        return self.score_pairs([TokenizedPair(list(p), list(c), list(r)) for p, c, r in rows])

    def score_pairs(self, pairs: list[TokenizedPair]) -> tuple[np.ndarray, np.ndarray]:
        """Summed reference log-probs of each pair's chosen and rejected response, (B,) each, in the
        pairs' order; computed SCORE_MICRO pairs at a time, sorted by the width each needs."""
        order = sorted(range(len(pairs)), key=lambda i: row_width(pairs[i], self.layout))
        out = np.zeros((2, len(pairs)), dtype=np.float64)  # (chosen, rejected) × B
        for start in range(0, len(order), SCORE_MICRO):
            part = order[start : start + SCORE_MICRO]
            batch = to_device(collate_batch([pairs[i] for i in part], self.pad_id, self.layout), self.device)
            with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                logps = pair_logps(self.model, batch, self.response_only).sum.double().cpu().numpy()  # (2b,)
            out[:, part] = logps.reshape(2, len(part))
        return out[0], out[1]

    def columns(self, pairs: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        """`ref_chosen` / `ref_rejected` (N,) float32 of `pairs`, scored in the driver's batches of
        BATCH (`score_here`): what `engine.local.train_local(reference_logps=...)` takes."""
        parts = [self.score_pairs(pairs[i : i + BATCH]) for i in range(0, len(pairs), BATCH)]
        return {k: torch.tensor(np.concatenate([p[j] for p in parts]) if parts else [], dtype=torch.float32)
                for j, k in enumerate(COLUMNS)}  # fmt: skip


def scoring_layout(cfg: RunConfig, model) -> str:
    """The scorer's collate layout: one row per pair (`shared`) where the run shares prompts
    (`train.prefix_sharing`) and this model takes it, else two (`pairs`)."""
    if cfg.train.prefix_sharing and shared_prefix_fallback((model,), cfg.data.max_length) is None:
        return "shared"
    return "pairs"


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
    size = weight_bytes(folder)
    rows = sum(ds.count() for ds in datasets.values())
    if size * rows > SMALL_SCORING:  # at least one token per pair: no need to count them
        return 1
    return 0 if size * sum(map(count_tokens, datasets.values())) <= SMALL_SCORING else 1


def count_tokens(ds) -> int:
    """Prompt, chosen and rejected ids of every row of a materialized dataset (its blocks' list
    lengths, read from the object store; no row is decoded)."""
    import pyarrow.compute as pc

    total = 0
    for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for col in ("prompt_ids", "chosen_ids", "rejected_ids"):
            total += int(pc.sum(pc.list_value_length(t.column(col))).as_py() or 0)
    return total


def attach(
    cfg: RunConfig, datasets: dict, log, stream: bool = False, workers: int | None = None
) -> tuple[dict, str]:
    """`datasets` ({"train": Dataset, "eval": Dataset?}) with the reference columns, read from the
    cache (computed first if missing), materialized or (`stream`) as a stream over the parquet files.
    `workers`: scoring actors, 0 for this process (default: `scoring_workers`).
    Returns them and "computed <key>" or "reused <key>"."""
    root = cache_dir(cfg)
    key = root.name
    outcome = "reused"
    if not (root / "done.json").is_file():
        outcome = "computed"
        tmp = root.with_name(f"{key}.tmp-{time.time_ns()}")
        t0 = time.monotonic()
        workers = scoring_workers(cfg, datasets, stream) if workers is None else workers
        run_config = cfg.model_dump(mode="json")
        if workers == 0:
            scorer = ScoreReference(run_config)
            for split, ds in datasets.items():
                score_here(ds, tmp / split, scorer)
            del scorer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the driver's GPU memory back for the training workers
        else:
            threads = max(1, int(ray.available_resources().get("CPU", 1)) // workers)
            for split, ds in datasets.items():
                write_in_order(
                    ds, tmp / split, ScoreReference,
                    fn_constructor_kwargs={"run_config": run_config, "threads": threads},
                    compute=ray.data.ActorPoolStrategy(size=workers), batch_size=BATCH, batch_format="numpy",
                    num_cpus=threads, num_gpus=1 if cfg.scaling.use_gpu else 0,
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
