"""`raydpo train` on Ray Train: workers, MLflow, checkpoints, resume, invariance (one shared Ray)."""

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEP_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "pairs_per_second",
             "tokens_per_second"]  # fmt: skip


def losses(summary):
    return [h["loss"] for h in summary["history"]]


# The settings every curve of this module shares: a quarter of the pairs held out and evaluated every
# 2 steps (checkpoints and evaluation do not change a curve).
CURVE = {"train": {"eval_every": 2}, "data": {"eval_fraction": 0.25}}
_PLAIN: dict = {}


def plain_run(run_cfg, tmp_path_factory) -> dict:
    """The module's plain run, run once for the tests that read it: 2 workers × batch 4, 4 steps,
    CURVE, checkpoints every 2 steps, tracked in a folder of its own. Its curve is the one that other
    worker shapes, FSDP and precomputed reference log-probs must follow (resumed runs: tests/
    test_fault_recovery.py, where a killed worker and a killed driver must follow their own).
    Returns the run's summary plus its MLflow `tracking_uri`."""
    if not _PLAIN:
        from raydpo.methods import train as run

        home = tmp_path_factory.mktemp("plain-run")
        uri = f"sqlite:///{home / 'mlflow.db'}"
        cfg = run_cfg(train={**CURVE["train"], "checkpoint_every": 2, "output_dir": str(home / "runs")},
                      data=CURVE["data"], tracking={"tracking_uri": uri, "experiment": "t"})  # fmt: skip
        _PLAIN.update(run(cfg, log=lambda *_: None), tracking_uri=uri)
    return _PLAIN


def test_two_workers_checkpoints_final_model_and_mlflow(ray_local, run_cfg, tmp_path_factory):
    from pathlib import Path

    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    out = plain_run(run_cfg, tmp_path_factory)
    run_dir = Path(out["run_dir"])
    ckpts = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    assert len(ckpts) == 2  # steps 2 and 4 (num_to_keep=2)
    assert all(
        (p / "model" / "model.safetensors").exists() and (p / "trainer_state.pt").exists() for p in ckpts
    )
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert model.config.num_hidden_layers == 2 and (run_dir / "final" / "tokenizer.json").exists()

    client = MlflowClient(tracking_uri=out["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == out["mlflow_run_id"]
    r = runs[0]
    assert r.info.status == "FINISHED"
    assert r.data.params["loss.beta"] == "0.1" and r.data.params["scaling.num_workers"] == "2"
    assert r.data.tags["raydpo.kind"] == "train" and r.data.tags["loss"] == "sigmoid"
    assert r.data.tags["num_workers"] == "2" and "ray.version" in r.data.tags
    for k in STEP_KEYS:
        hist = client.get_metric_history(r.info.run_id, k)
        assert [m.step for m in hist] == [1, 2, 3, 4], k
    assert [m.step for m in client.get_metric_history(r.info.run_id, "eval/loss")] == [0, 2, 4]
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"config.yaml", "data_report.json", "final_model"} <= arts
    # Self-describing: dataset input with its profile, system metrics, description, code and model.
    (ds,) = [d for d in r.inputs.dataset_inputs if d.tags[0].value == "training"]
    profile = __import__("json").loads(ds.dataset.profile)
    assert ds.dataset.source_type == "builtin" and profile["kept"] + profile["quarantined"] == profile["rows"]
    assert client.get_metric_history(r.info.run_id, "system/cpu_utilization_percentage")
    assert client.get_metric_history(r.info.run_id, "system/process_rss_megabytes")
    assert "sigmoid" in r.data.tags["mlflow.note.content"] and "4 steps" in r.data.tags["mlflow.note.content"]
    assert len(r.data.tags["raydpo.source_digest"]) == 16
    assert r.data.tags["raydpo.final_model"] == str(run_dir / "final")
    assert "loss.beta" in r.data.params and not any(k.startswith("ppo.") for k in r.data.params)


def test_two_workers_batch4_equal_one_worker_batch8(ray_local, run_cfg, tmp_path_factory):
    from raydpo.methods import train as run

    two = plain_run(run_cfg, tmp_path_factory)
    one = run(run_cfg(run_name="w1", scaling={"num_workers": 1}, train={**CURVE["train"], "batch_size": 8},
                      data=CURVE["data"], tracking={"enabled": False}), log=lambda *_: None)  # fmt: skip
    fsdp = run(run_cfg(run_name="fsdp", scaling={"strategy": "fsdp"}, data=CURVE["data"],
                       train={**CURVE["train"], "checkpoint_every": 2}, tracking={"enabled": False}),
               log=lambda *_: None)  # fmt: skip
    assert len(losses(two)) == len(losses(one)) == len(losses(fsdp)) == 4
    assert losses(two) == pytest.approx(losses(one), abs=1e-4)
    assert losses(fsdp) == pytest.approx(losses(one), abs=1e-4)  # FSDP2 (fully_shard) on gloo, same curve
    assert [h["eval/loss"] for h in fsdp["history"] if "eval/loss" in h] == pytest.approx(
        [h["eval/loss"] for h in two["history"] if "eval/loss" in h], abs=1e-4)  # fmt: skip
    assert losses(two)[-1] < losses(two)[0] - 0.05  # it learns, so the curves are not trivially equal
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(fsdp["final_model"])  # gathered full weights, HF layout
    b = AutoModelForCausalLM.from_pretrained(two["final_model"])
    diffs = [(p - q).abs().max().item() for p, q in zip(a.state_dict().values(), b.state_dict().values())]
    assert len(diffs) == len(b.state_dict()) and max(diffs) < 1e-4


def test_epoch_order_is_seeded_and_differs_per_epoch(ray_local, run_cfg):
    """Every worker sees the same seeded order (so their slices partition each global batch), the
    order changes from epoch to epoch, and the same seed gives the same order again."""
    import ray

    from raydpo.engine.worker import ShardSource

    ds = ray.data.from_items(
        [
            {"id": str(i), "prompt_ids": [1], "chosen_ids": [100 + i], "rejected_ids": [200 + i]}
            for i in range(32)
        ]
    ).materialize()
    cfg = run_cfg(train={"batch_size": 4})

    def order(epoch, rank=0, world=1, seed_cfg=cfg):
        t = seed_cfg.train
        src = ShardSource(ds.iterator(), t.batch_size, t.seed, rank, world, 0, True, "cpu")
        chosen = [b["input_ids"][: b["input_ids"].shape[0] // 2, 1] for b in src.epoch(epoch)]
        return [t for c in chosen for t in c.tolist()]

    e0, e1 = order(0), order(1)
    assert sorted(e0) == sorted(e1) == list(range(100, 132))
    assert e0 != e1 and order(0) == e0
    assert order(0, seed_cfg=run_cfg(train={"batch_size": 4, "seed": 7})) != e0
    r0, r1 = order(0, 0, 2), order(0, 1, 2)  # two workers: each takes its half of every global batch of 8
    assert sorted(r0 + r1) == sorted(e0) and not set(r0) & set(r1)


def test_parquet_source_quarantines_by_id(ray_local, run_cfg, tmp_path):
    """Parquet is read in parallel blocks without a global index: quarantine lines carry the row's id."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydpo.data.pipeline import prepare_dataset

    rows = [
        {"id": f"r{i}", "prompt": f"Review {i}:", "chosen": f" good {i}", "rejected": f" bad {i}"}
        for i in range(9)
    ]
    rows.append({"id": "broken", "prompt": "x", "chosen": "same", "rejected": "same"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = run_cfg(data={"source": str(tmp_path / "d.parquet"), "max_bad_fraction": 0.5})
    good, report = prepare_dataset(cfg, cfg.data.source, tmp_path / "q.jsonl")
    assert good.count() == 9 and report.counts == {"identical": 1}
    line = json.loads((tmp_path / "q.jsonl").read_text())
    assert line["row"] == "broken" and line["reason"] == "identical" and line["raw"]["chosen"] == "same"


def test_reference_cache_keeps_row_order_from_an_actor_pool(ray_local, tmp_path):
    """Two actors finishing batches out of turn: the cache still reads back in the scored dataset's
    row order (so a run that computes it, one that reuses it and a live reference train on the same
    batches), several times over, since the disorder it guards against is by chance."""
    import random
    import time

    from raydpo.engine.reference import POSITION, _read, write_in_order

    class Slow:  # a local class: shipped to the actors by value
        def __call__(self, batch):
            time.sleep(random.random() * 0.1)
            return batch

    ds = ray_local.data.range(64, override_num_blocks=8).materialize()
    opts = ds.context.execution_options
    opts.preserve_order = True  # the order a Ray Train worker iterates `ds` in (launch.fit's DataConfig)
    seen = [r["id"] for r in ds.iter_rows()]
    opts.preserve_order = False
    assert sorted(seen) == list(range(64))
    for attempt in range(3):
        write_in_order(ds, tmp_path / str(attempt), Slow, compute=ray_local.data.ActorPoolStrategy(size=2),
                       batch_size=4, num_cpus=1)  # fmt: skip
        back = _read(tmp_path / str(attempt))
        assert [r["id"] for r in back.iter_rows()] == seen and POSITION not in back.schema().names
    streamed = _read(tmp_path / "0", stream=True)
    assert POSITION not in streamed.schema().names and sorted(r["id"] for r in streamed.iter_rows()) == list(
        range(64)
    )


def test_reference_log_probs_are_computed_once_and_train_the_same(
    ray_local, run_cfg, tmp_path, tmp_path_factory
):
    """`train.precompute_reference`: a Ray Data stage scores the pairs once (one row per pair, as the run
    trains), a second run with the same key reads the cache, and the curve is the plain run's, whose
    reference is live and whose pairs take two rows each. The second run also
    takes the Ray workers' path for `train.packing` with 2 accumulation micro-batches (the packed
    layout, `pair_row`, the split by micro-batch; the built-in pairs are too alike in length for two
    to share a row, so the packing itself is tested in tests/test_prefix_sharing.py)."""
    import json

    from mlflow.tracking import MlflowClient

    from raydpo.methods import train as run

    live = plain_run(run_cfg, tmp_path_factory)
    lines: list[str] = []
    pre = {**CURVE["train"], "precompute_reference": True, "reference_workers": 1,  # the actor-pool stage
           "prefix_sharing": True}  # scored and trained one row per pair  # fmt: skip
    first = run(run_cfg(run_name="pre1", train=pre, data=CURVE["data"]), log=lines.append)
    packed = {**pre, "packing": True, "grad_accum_steps": 2}  # packing is not part of the key
    again = run(run_cfg(run_name="pre2", train=packed, data=CURVE["data"]), log=lines.append)
    computed = [x for x in lines if x.startswith("reference log-probs: computed")]
    reused = [x for x in lines if x.startswith("reference log-probs: reused")]
    assert len(computed) == 1 and len(reused) == 1, lines
    assert "(by 1 Ray Data actor(s))" in computed[0]
    (cache,) = (tmp_path / "runs" / ".reference-cache").iterdir()
    done = json.loads((cache / "done.json").read_text())
    assert done["splits"] == ["eval", "train"] and done["rows"] == 64  # builtin:tiny-prefs, all rows

    # Scored in this process instead (`reference_workers: 0`, what `auto` picks for such tiny work):
    # the same rows in the same order with the same log-probs, so the same cache.
    from raydpo.engine.launch import build_datasets
    from raydpo.engine.reference import _read, attach

    here_train = {**pre, "reference_workers": 0, "output_dir": str(tmp_path / "here")}
    here_cfg = run_cfg(run_name="here", data=CURVE["data"], train=here_train)
    train, evalset, _ = build_datasets(here_cfg, log=lambda *_: None)
    here_lines: list[str] = []
    attach(here_cfg, {"train": train, "eval": evalset}, here_lines.append)
    assert "(in this process)" in here_lines[0], here_lines
    (here,) = (tmp_path / "here" / ".reference-cache").iterdir()
    assert here.name == cache.name  # the key does not depend on how it is computed
    for split in ("train", "eval"):
        a, b = _read(cache / split).to_pandas(), _read(here / split).to_pandas()
        assert list(a["id"]) == list(b["id"]) and len(a) > 0
        for col in ("ref_chosen", "ref_rejected"):
            assert a[col].to_numpy() == pytest.approx(b[col].to_numpy(), abs=1e-5), (split, col)
    keys = ["loss", "logps/chosen", "rewards/margins", "eval/loss"]
    for h_live, h_pre, h_again in zip(live["history"], first["history"], again["history"]):
        for k in (k for k in keys if k in h_live):
            assert h_pre[k] == pytest.approx(h_live[k], abs=1e-5), k
            assert h_again[k] == pytest.approx(h_live[k], rel=1e-4, abs=1e-4), k
    assert len(first["history"]) == len(live["history"]) == 4
    client = MlflowClient(tracking_uri=run_cfg().tracking.tracking_uri)
    tags = {r.data.tags["mlflow.runName"]: r.data.tags.get("raydpo.reference_logps", "")
            for r in client.search_runs([client.get_experiment_by_name("t").experiment_id])}  # fmt: skip
    assert tags["pre1"] == f"computed {cache.name}" and tags["pre2"] == f"reused {cache.name}"
