"""Streamed data (`data.streaming`): tokenized pairs stored as parquet and split across workers.

The pure parts (when a run streams, the hash split of an eval share) are tested without Ray; two
Ray tests run the real path: `benchmarks/stream.py` (validate → tokenize → parquet → 2 Ray Train
workers, each pair read once, by one worker) and a 2-worker `raydpo train` run that streams, with a
quarantined row and an eval share. The 2-million-pair figures come from
`python -m benchmarks.stream --pairs 2000000` (README, "Throughput").
"""

import json

import pyarrow as pa
import pytest


def _cfg(**data):
    from raydpo.config import build_config

    return build_config({"data": data})


def test_streams_follows_the_setting_and_auto_streams_only_large_local_files(tmp_path, monkeypatch):
    from raydpo.data import pipeline

    small = tmp_path / "p.jsonl"
    small.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert pipeline.streams(_cfg(source=str(small), streaming="on"))
    assert not pipeline.streams(_cfg(source=str(small), streaming="off"))
    assert not pipeline.streams(_cfg(source=str(small)))  # auto, 49 bytes
    monkeypatch.setattr(pipeline, "STREAM_AUTO_BYTES", 40)
    assert pipeline.streams(_cfg(source=str(small)))  # auto, over the threshold
    assert not pipeline.streams(_cfg(source="builtin:tiny-prefs"))  # read through the driver


def _pairs_table(n: int) -> pa.Table:
    return pa.table({
        "id": [f"p{i}" for i in range(n)],
        "prompt_ids": [[1, i % 7, i] for i in range(n)],
        "chosen_ids": [[i, 2] for i in range(n)],
        "rejected_ids": [[3, i] for i in range(n)],
    })  # fmt: skip


def test_hash_split_partitions_the_rows_the_same_way_every_time():
    """Held out and kept are disjoint, together every row, about the asked share (2000 rows at 0.25:
    a binomial standard deviation of about 19 rows, so 500 ± 80 is a 4-sigma band), the same on a
    second pass, and another seed holds out other rows."""
    from raydpo.data.pipeline import _hash_part

    t = _pairs_table(2000)
    held = _hash_part(t, 0.25, seed=0, held_out=True).column("id").to_pylist()
    kept = _hash_part(t, 0.25, seed=0, held_out=False).column("id").to_pylist()
    assert not set(held) & set(kept) and len(held) + len(kept) == 2000
    assert 420 <= len(held) <= 580
    assert held == _hash_part(t, 0.25, seed=0, held_out=True).column("id").to_pylist()
    assert held != _hash_part(t, 0.25, seed=1, held_out=True).column("id").to_pylist()


@pytest.mark.ray
@pytest.mark.slow
def test_a_generated_source_streams_to_two_workers_each_pair_once(ray_local, tmp_path):
    """2,000 generated pairs (random words: a pair whose two responses come out identical is
    quarantined, about 3 in 100,000) through validate → tokenize → parquet → 2 workers with batch 8:
    each worker gets half the kept pairs (Ray Train's equal split) and reads its full batches of
    them; no pair reaches both workers. Memory: each process stays under 1.5 GiB (the figures at 2
    million pairs are in the README)."""
    from benchmarks.stream import run

    fig = run(2000, workers=2, root=tmp_path, check_ids=True, log=lambda *_: None)
    assert 1990 <= fig["kept"] <= 2000
    per_worker = fig["kept"] // 2 // 8 * 8
    assert fig["pairs_per_worker"] == [per_worker, per_worker]
    a, b = (set(ids) for ids in fig["ids"])
    assert len(a) == len(b) == per_worker and not a & b
    assert a | b <= {f"p{i}" for i in range(2000)}
    assert max(fig["worker_peak_rss_mib"]) < 1536 and fig["driver_peak_rss_mib"] < 1536
    # private memory (USS), sampled in each worker: a part of its resident memory, and more than an
    # empty process's (the worker has imported torch and Ray Data)
    assert all(100 < uss <= rss for uss, rss in zip(fig["worker_peak_uss_mib"], fig["worker_peak_rss_mib"]))
    assert list((tmp_path / "runs" / "stream" / "data" / "train").glob("*.parquet"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_streamed_two_worker_run_trains_quarantines_and_evaluates(ray_local, run_cfg, tmp_path):
    from raydpo.methods import train as run

    rows = [{"prompt": f"q {i} " * 3, "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(80)]
    rows[5] = {"prompt": "q", "chosen": "same", "rejected": "same"}  # quarantined: identical responses
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = run_cfg(data={"source": str(src), "streaming": "on", "eval_fraction": 0.25},
                  train={"eval_every": 2, "max_steps": 4}, tracking={"enabled": False})  # fmt: skip
    out = run(cfg, log=lambda *_: None)
    losses = [h["loss"] for h in out["history"] if "loss" in h]
    assert len(losses) == 4 and all(v == v for v in losses)
    assert any("eval/loss" in h for h in out["history"])
    q = [json.loads(x) for x in (tmp_path / "runs" / "r" / "quarantine.jsonl").read_text().splitlines()]
    assert [x["row"] for x in q] == [5]
    for split in ("train", "eval"):  # the held-out share is stored once, apart
        assert list((tmp_path / "runs" / "r" / "data" / split).glob("*.parquet"))
