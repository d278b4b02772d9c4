"""What makes a small run start fast, and the guarantees each shortcut keeps.

- A small source (a JSON-lines file, a built-in set of one batch) is validated and tokenized by the
  driver itself (`data.tokenize_workers: auto` → 0): the same Dataset, row for row, block for block
  and in the same order, and the same quarantine file, as the Ray Data actor stage gives (both paths
  run here on the same sources).
- A small reference scoring (`train.precompute_reference`) runs in the driver
  (`train.reference_workers: auto` → 0); tests/test_ray_train.py checks that it writes the cache the
  actor stage writes.
- Ray Train's controller gets the loop config as an object reference (`engine.launch.fit`), so it
  never unpickles the Method (which would import torch and transformers there), and a backend config
  whose module imports no torch (`engine.backend.ProcessGroupConfig`; Ray's `TorchConfig` does).
- Ray Train starts no actor the run does not use (`engine.launch.RunTrainer`): workers that each read
  the whole dataset get its iterators in the loop config (no DatasetManager actor), and a local Ray
  has no placement-group cleaner actor.
- A Ray Train worker takes Ray Data's batches in runs (`engine.worker.pull_ahead`), in their order.
- A Ray Train worker imports neither peft (LoRA only) nor the distributed state-dict helpers (FSDP
  only) unless the run uses them.
- A driver's runs share one progress-queue actor, one after another.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def _cfg(**data):
    from raydpo.config import build_config

    return build_config({"data": data})


def test_tokenize_workers_auto_is_the_driver_for_small_sources_not_streamed(tmp_path, monkeypatch):
    from raydpo.data import pipeline

    small = tmp_path / "p.jsonl"
    small.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert pipeline.tokenize_workers(_cfg(source=str(small)), streamed=False) == 0
    assert pipeline.tokenize_workers(_cfg(source=str(small)), streamed=True) == 1  # writes parquet as it goes
    # a built-in set of one batch's rows (64) goes to the driver; more rows, or other sources, keep
    # the actor under auto: only for these are the blocks known to agree
    assert pipeline.tokenize_workers(_cfg(source="builtin:tiny-prefs"), streamed=False) == 0
    assert pipeline.tokenize_workers(_cfg(source="builtin:nope"), streamed=False) == 1
    monkeypatch.setattr(pipeline, "PREPARE_BATCH", 63)
    assert pipeline.tokenize_workers(_cfg(source="builtin:tiny-prefs"), streamed=False) == 1
    assert pipeline.tokenize_workers(_cfg(source="builtin:tiny-prefs", max_rows=63), streamed=False) == 0
    monkeypatch.undo()
    parquet = tmp_path / "p.parquet"
    parquet.write_bytes(b"PAR1")
    assert pipeline.tokenize_workers(_cfg(source=str(parquet)), streamed=False) == 1
    assert pipeline.tokenize_workers(_cfg(source=str(small), eval_source=str(parquet)), streamed=False) == 1
    assert pipeline.tokenize_workers(_cfg(source=str(small), tokenize_workers=3), streamed=False) == 3
    assert pipeline.tokenize_workers(_cfg(source=str(small), tokenize_workers=0), streamed=True) == 0
    monkeypatch.setattr(pipeline, "DRIVER_AUTO_BYTES", 40)  # the file is 49 bytes
    assert pipeline.tokenize_workers(_cfg(source=str(small)), streamed=False) == 1


def test_tokenize_workers_rejects_a_negative_count():
    from raydpo.errors import ConfigError

    with pytest.raises(ConfigError, match="tokenize_workers"):
        _cfg(tokenize_workers=-1)
    assert _cfg(tokenize_workers="auto").data.tokenize_workers == "auto"


def test_reference_workers_auto_scores_small_work_in_the_driver(tiny_llama_dir, monkeypatch):
    """auto: the driver (0) while reference weight bytes × the tokens to score (every pair's prompt,
    chosen and rejected ids, counted from the blocks) is at most SMALL_SCORING, else one actor, and
    no token is counted when the rows alone exceed it; a number is used as given; a streamed dataset
    always gets an actor; a hub name (size unknown here) gets an actor; a negative number is refused."""
    import pyarrow as pa

    from raydpo.config import build_config
    from raydpo.engine import reference
    from raydpo.errors import ConfigError
    from raydpo.models.paths import weight_bytes

    counted = []

    class Rows:  # what scoring_workers asks of a materialized Dataset: its rows and its blocks
        def __init__(self, n, width):
            self.n, self.width = n, width

        def count(self):
            return self.n

        def iter_batches(self, batch_size=None, batch_format="pyarrow"):
            counted.append(self.n)
            ids = pa.array([[7] * self.width] * self.n, pa.list_(pa.int64()))
            for lo in range(0, self.n, 10):  # several blocks
                yield pa.table({c: ids.slice(lo, 10) for c in ("prompt_ids", "chosen_ids", "rejected_ids")})

    def workers(policy=str(tiny_llama_dir), rows=64, stream=False, **train):
        counted.clear()
        data = {"max_length": 48, "max_prompt_length": 24}
        cfg = build_config({"model": {"policy": policy}, "train": train, "data": data})
        return reference.scoring_workers(cfg, {"train": Rows(rows, 5), "eval": Rows(16, 2)}, stream)

    size = weight_bytes(tiny_llama_dir)
    tokens = 64 * 3 * 5 + 16 * 3 * 2  # every block of both splits counted
    assert reference.count_tokens(Rows(64, 5)) == 64 * 3 * 5
    assert 0 < size * tokens <= reference.SMALL_SCORING and workers() == 0 and counted == [64, 16]
    monkeypatch.setattr(reference, "SMALL_SCORING", size * tokens)
    assert workers() == 0 and workers(rows=65) == 1  # at most the threshold stays in the driver
    monkeypatch.setattr(reference, "SMALL_SCORING", size * tokens - 1)
    assert workers() == 1 and counted == [64, 16]
    monkeypatch.setattr(reference, "SMALL_SCORING", size * 79)  # fewer than one token per row
    assert workers() == 1 and counted == []  # decided from the row count, nothing read
    assert workers(reference_workers=3) == 3 and workers(rows=10**9, reference_workers=0) == 0
    assert workers(stream=True) == 1 and workers(stream=True, reference_workers=0) == 1
    assert workers(stream=True, reference_workers=2) == 2
    assert workers(policy="some-org/some-model") == 1
    with pytest.raises(ConfigError, match="reference_workers"):
        build_config({"train": {"reference_workers": -1}})


def _mixed_jsonl(path: Path) -> Path:
    good = [{"id": f"g{i}", "prompt": f"Question {i}?" + " more" * (i % 5), "chosen": f" yes {i}",
             "rejected": f" no {i}"} for i in range(600)]  # fmt: skip
    lines = [json.dumps(r) for r in good]
    lines[3] = "{not json"  # undecodable
    lines[10] = json.dumps({"id": "same", "prompt": "p", "chosen": " x", "rejected": " x"})  # identical
    lines[300] = json.dumps({"id": "half", "prompt": "p", "chosen": " x"})  # missing_field
    lines.insert(20, "")  # a blank line is not a row
    path.write_text("\n".join(lines) + "\n")
    return path


def _parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"r{i}", "prompt": f"Review {i}:", "chosen": f" good {i}", "rejected": f" bad {i}"}
            for i in range(300)]  # fmt: skip
    rows[7] = {"id": "broken", "prompt": "x", "chosen": "same", "rejected": "same"}
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=64)
    return path


@pytest.mark.ray
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "jsonl-max-rows", "builtin"])
def test_driver_and_actor_preparation_give_the_same_dataset_and_quarantine(
    ray_local, tmp_path, tiny_llama_dir, kind
):
    """`data.tokenize_workers` 0 (the driver) against 1 (the Ray Data actor stage) on one source: the
    same rows in the same order (training order depends on it), the same report, the same quarantine
    file byte for byte; for JSON lines (what `auto` sends to the driver) also the same blocks, on
    which `train_test_split`'s shuffle depends (checked on a held-out share too)."""
    from raydpo.config import build_config
    from raydpo.data.pipeline import prepare_dataset

    if kind == "parquet":
        source = _parquet(tmp_path / "d.parquet")
    elif kind == "builtin":
        source = "builtin:tiny-prefs"
    else:
        source = _mixed_jsonl(tmp_path / "d.jsonl")
    data = {"source": str(source), "max_bad_fraction": 0.5, "max_length": 40, "max_prompt_length": 20}
    if kind == "jsonl-max-rows":
        data["max_rows"] = 333  # cuts inside the second batch of 256
    outcomes = {}
    for workers in (0, 1):
        cfg = build_config({"model": {"policy": str(tiny_llama_dir)}, "train": {"batch_size": 4},
                            "data": {**data, "tokenize_workers": workers}})  # fmt: skip
        q = tmp_path / f"q{workers}.jsonl"
        good, report = prepare_dataset(cfg, str(source), q)
        plain = lambda v: v.tolist() if hasattr(v, "tolist") else v  # noqa: E731
        rows = [{k: plain(v) for k, v in r.items()} for r in good.iter_rows()]
        blocks = [b.num_rows() for b in good.iter_internal_ref_bundles()]
        held = [r["id"] for r in good.train_test_split(test_size=0.2, shuffle=True, seed=3)[1].iter_rows()]
        outcomes[workers] = (rows, report.to_dict() | {"path": None}, q.read_bytes() if q.exists() else b"",
                             blocks, held)  # fmt: skip
    (rows0, report0, q0, blocks0, held0), (rows1, report1, q1, blocks1, held1) = outcomes[0], outcomes[1]
    assert rows0 == rows1 and report0 == report1 and q0 == q1
    if kind != "parquet":
        assert blocks0 == blocks1 == [len(rows0)] and held0 == held1
    if kind == "builtin":  # 64 good rows, held by Ray in 64 blocks before the stage joins them
        assert len(rows0) == report0["kept"] == 64 and held0
        return
    assert report0["bad"] >= 1 and len(rows0) == report0["kept"] > 200
    if kind == "jsonl-max-rows":
        assert report0["total"] == 333


@pytest.mark.ray
def test_an_empty_source_is_refused_the_same_way_on_both_paths(ray_local, tmp_path, tiny_llama_dir):
    from raydpo.config import build_config
    from raydpo.data.pipeline import prepare_dataset
    from raydpo.errors import DataError

    empty = tmp_path / "eval.jsonl"
    empty.write_text("\n\n")  # blank lines are not rows
    for workers in (0, 1):
        cfg = build_config({"model": {"policy": str(tiny_llama_dir)},
                            "data": {"source": "builtin:tiny-prefs", "eval_source": str(empty),
                                     "tokenize_workers": workers}})  # fmt: skip
        with pytest.raises(DataError, match="eval.jsonl has no rows: every line of the file is blank"):
            prepare_dataset(cfg, str(empty), tmp_path / f"q{workers}.jsonl")


def _imports_torch_when_unpickled(obj) -> bool:
    """Whether a fresh process that unpickles `obj` (as Ray Train's controller does) imports torch."""
    import cloudpickle

    code = "import pickle, sys; c = pickle.load(sys.stdin.buffer); c.to_dict(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], input=cloudpickle.dumps(obj), capture_output=True)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode().strip() == "True"


@pytest.mark.ray
def test_the_controller_gets_the_loop_config_as_an_object_reference(ray_local, run_cfg, monkeypatch):
    import ray
    from ray.train.torch import TorchConfig

    from raydpo.engine import launch

    seen = {}

    class FakeTrainer:
        def __init__(self, fn, train_loop_config, **kwargs):
            seen.update(config=train_loop_config, **kwargs)

        def fit(self):
            return "fitted"

    monkeypatch.setattr(launch, "RunTrainer", FakeTrainer)
    loop_config = {"method": "dpo", "pad_id": 0, "total_steps": 3}
    assert launch.fit(run_cfg(), loop_config, {}) == "fitted"
    assert set(seen["config"]) == {"ref"} and isinstance(seen["config"]["ref"], ray.ObjectRef)
    given = ray.get(seen["config"]["ref"])
    assert {k: given[k] for k in loop_config} == loop_config and given["shards"] == {}
    # The backend config: Ray's fields and defaults (TorchTrainer sets the backend), and no torch there.
    assert seen["torch_config"].to_dict() == TorchConfig().to_dict()
    assert not _imports_torch_when_unpickled(seen["torch_config"])
    assert _imports_torch_when_unpickled(TorchConfig())  # what the controller imported before


@pytest.mark.ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # unpickling a DataContext sets old fields too
def test_workers_that_read_the_whole_dataset_get_its_iterators_without_rays_dataset_actor(
    ray_local, run_cfg, monkeypatch
):
    """Not split: Ray Train gets no datasets and leaves out its DatasetManager actor; each worker gets
    the iterators DataConfig would give it (the rows in order, preserve_order) and the driver's
    DataContext. Split (data.streaming): Ray Train's own datasets and callback. The placement-group
    cleaner actor is left out on a local Ray only."""
    import ray
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from raydpo.engine import launch

    seen = {}

    class FakeTrainer:
        def __init__(self, fn, train_loop_config, **kwargs):
            seen.update(config=ray.get(train_loop_config["ref"]), **kwargs)

        def fit(self):
            return "fitted"

    monkeypatch.setattr(launch, "RunTrainer", FakeTrainer)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    train = ray.data.from_items([{"i": i} for i in range(10)]).materialize()
    evalset = ray.data.from_items([{"i": -i} for i in range(3)]).materialize()
    launch.fit(run_cfg(), {"split_data": False}, {"train": train, "eval": evalset})
    assert seen["datasets"] == {}
    assert set(seen["leave_out"]) == {DatasetsCallback, PlacementGroupCleanerCallback}
    shards = seen["config"]["shards"]
    assert [r["i"] for r in shards["train"].iter_rows()] == list(range(10))
    assert [r["i"] for r in shards["eval"].iter_rows()] == [0, -1, -2]
    assert shards["train"]._base_dataset.context.execution_options.preserve_order
    assert seen["config"]["data_context"].enable_progress_bars is False  # quiet_ray's, carried over

    launch.fit(run_cfg(), {"split_data": True}, {"train": train})
    assert set(seen["datasets"]) == {"train"} and "shards" not in seen["config"]
    assert seen["leave_out"] == (PlacementGroupCleanerCallback,)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster: its cleaner stays
    launch.fit(run_cfg(), {"split_data": True}, {"train": train})
    assert seen["leave_out"] == ()


@pytest.mark.ray
def test_run_trainer_leaves_out_exactly_the_callbacks_it_is_told(ray_local, run_cfg):
    """The names RunTrainer filters exist in this Ray (pinned) and are among Ray Train's defaults;
    only they go."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from raydpo.engine import launch

    scaling, run_config = launch.ray_train_configs(run_cfg())

    def kinds(leave_out):
        trainer = launch.RunTrainer(lambda c: None, train_loop_config={}, scaling_config=scaling,
                                    run_config=run_config, leave_out=leave_out)  # fmt: skip
        return [type(c) for c in trainer._create_default_callbacks()]

    everything = kinds(())
    assert DatasetsCallback in everything and PlacementGroupCleanerCallback in everything
    fewer = kinds((DatasetsCallback, PlacementGroupCleanerCallback))
    assert fewer == [k for k in everything if k not in (DatasetsCallback, PlacementGroupCleanerCallback)]


def test_a_worker_imports_neither_peft_nor_the_state_dict_helpers_unless_the_run_uses_them():
    heavy = ("peft", "torch.distributed.checkpoint.state_dict")
    code = (
        f"import sys, raydpo.engine.worker, raydpo.methods; print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_pull_ahead_keeps_the_order_and_takes_one_batch_then_runs():
    import torch

    from raydpo.engine.worker import pull_ahead

    taken = []

    def source(n):
        for i in range(n):
            taken.append(i)
            yield {"x": torch.zeros(4, dtype=torch.int64) + i, "ids": [str(i)]}

    out = pull_ahead(source(10), most=4)
    first = next(out)
    assert int(first["x"][0]) == 0 and taken == [0]  # step 1 waits for one batch only
    second = next(out)
    assert int(second["x"][0]) == 1 and taken == [0, 1, 2, 3, 4]  # then a run of 4
    rest = [int(b["x"][0]) for b in out]
    assert rest == list(range(2, 10)) and taken == list(range(10))
    small = pull_ahead(source(6), most=64, most_bytes=64)  # each batch holds 32 bytes of tensors
    next(small)
    taken.clear()
    next(small)
    assert taken == [1, 2]  # the run stops once it holds 64 bytes


def test_a_local_ray_starts_fewer_helper_processes_and_a_cluster_keeps_rays_defaults(monkeypatch):
    """start_ray on one local node turns off Ray Train's preemption watcher (nothing to preempt) and has
    Ray Data read parquet footers with one actor instead of 32 (each is a process), and sets the rest
    of LOCAL_RAY_ENV (metrics, task events, log monitor); joining a cluster leaves Ray's defaults, and
    a user's own setting stands."""
    import os

    import ray

    from raydpo.engine import session

    calls, policies = [], []
    before = os.sched_getscheduler(0)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    record = lambda **kw: (calls.append(kw), policies.append(os.sched_getscheduler(0)))  # noqa: E731
    monkeypatch.setattr(ray, "init", record)
    monkeypatch.setattr(session, "quiet_ray", lambda: None)
    watcher, footers = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
    cases = [(None, None, ("0", "1")), (None, "4", ("4", "4")), ("127.0.0.1:6379", None, (None, None))]
    for address, preset, want in cases:
        for var in (watcher, footers):
            monkeypatch.delenv(var, raising=False)
            if preset:
                monkeypatch.setenv(var, preset)
        if address:
            monkeypatch.setenv("RAY_ADDRESS", address)
            monkeypatch.setattr(session, "check_ray_address", lambda a: None)
        else:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        others = [k for k in session.LOCAL_RAY_ENV if k not in (watcher, footers)]
        for var in others:
            monkeypatch.delenv(var, raising=False)
        session.start_ray(2)
        assert (os.environ.get(watcher), os.environ.get(footers)) == want, (address, preset)
        set_here = [os.environ.get(k) for k in others]
        assert set_here == ([None] * len(others) if address else [session.LOCAL_RAY_ENV[k] for k in others])
    assert [c.get("address") for c in calls] == ["local", "local", None]
    # A local Ray's processes start under SCHED_BATCH (they inherit it); a cluster's are not ours.
    assert policies == [os.SCHED_BATCH, os.SCHED_BATCH, before] and os.sched_getscheduler(0) == before


@pytest.mark.ray
def test_a_local_rays_processes_do_not_preempt_the_training_thread(ray_local):
    """The local Ray (started like start_ray's) runs under SCHED_BATCH, so its processes' frequent
    wakeups do not preempt training threads; a worker thread that trains takes SCHED_OTHER back."""
    import os
    import threading

    from raydpo.engine.session import take_cpu_back

    ray = ray_local
    started = ray._private.worker._global_node.live_processes()  # [(kind, Popen)]: GCS, raylet, ...
    kinds = {kind: os.sched_getscheduler(proc.pid) for kind, proc in started}
    assert "raylet" in kinds and set(kinds.values()) == {os.SCHED_BATCH}, kinds

    @ray.remote(num_cpus=0)
    def policies():
        seen = [os.sched_getscheduler(0)]
        take_cpu_back()
        return [*seen, os.sched_getscheduler(0)]

    assert ray.get(policies.remote()) == [os.SCHED_BATCH, os.SCHED_OTHER]
    out = []
    t = threading.Thread(target=lambda: (take_cpu_back(), out.append(os.sched_getscheduler(0))))
    t.start()
    t.join()
    assert out == [os.sched_getscheduler(0)]  # a thread that is not batch stays as it is


@pytest.mark.ray
def test_a_driver_reuses_its_progress_queue_and_drops_an_earlier_runs_late_lines(ray_local):
    """One channel actor (a process) serves a driver's runs one after another; a run still going holds
    its own, and a line that an earlier run's worker sends after that run ended is not shown."""
    from raydpo.engine.progress import Progress, sender

    shown = (("loss", "loss"),)
    with Progress(2, shown, stream=None) as first:
        sender(first.channel)({"step": 1, "loss": 0.5})
    assert [h["step"] for h in first.history] == [1] and "_run" not in first.history[0]
    sender(first.channel)({"step": 2, "loss": 0.4})  # late: the first run is over
    with Progress(2, shown, stream=None) as second, Progress(2, shown, stream=None) as third:
        sender(second.channel)({"step": 1, "loss": 0.3})
        sender(third.channel)({"step": 1, "loss": 0.2})
    actor = lambda p: p.actor._actor_id  # noqa: E731
    assert actor(second) == actor(first) and actor(third) != actor(first)
    assert [h["loss"] for h in second.history] == [0.3] and [h["loss"] for h in third.history] == [0.2]


@pytest.mark.ray
def test_a_runs_inputs_reach_each_worker_that_asks_and_a_stopped_run_hands_out_none(ray_local):
    """`Progress.post` / `progress.fetch`: a worker that asks first waits for the driver; every worker
    (and a restarted one) gets the same inputs; a run that stopped before training posts None."""
    import ray

    from raydpo.engine.progress import Progress, fetch

    @ray.remote(num_cpus=0)
    def worker(channel):
        return fetch(channel)

    shown = (("loss", "loss"),)
    with Progress(None, shown, stream=None) as run:
        early = worker.remote(run.channel)
        assert ray.wait([early], timeout=1.0)[0] == []  # nothing posted yet: it waits
        posted = run.post({"total_steps": 3, "rows": list(range(5))})
        assert ray.get(early) == {"total_steps": 3, "rows": list(range(5))}
        assert ray.get(worker.remote(run.channel)) == ray.get(posted)  # asked again: the same
    with Progress(None, shown, stream=None) as stopped:
        assert stopped.actor._actor_id == run.actor._actor_id  # the channel, reused by the next run
        stopped.post(None)
        assert ray.get(worker.remote(stopped.channel)) is None


@pytest.mark.ray
def test_a_bad_input_found_while_ray_train_starts_stops_it_before_training(ray_local, run_cfg, monkeypatch):
    """The driver prepares the data while Ray Train starts (engine.launch.run); an error there is
    raised as it is, after the started workers returned without training and `fit` ended."""
    import threading

    from raydpo.engine import launch
    from raydpo.errors import DataError
    from raydpo.methods import train

    fits = []
    real_fit = launch.fit

    def fit(*args):
        fits.append(threading.current_thread() is not threading.main_thread())
        return real_fit(*args)

    def bad_data(cfg, log, texts=False):
        raise DataError("d.jsonl: 9 of 10 rows quarantined, over data.max_bad_fraction=0.5")

    monkeypatch.setattr(launch, "fit", fit)
    monkeypatch.setattr(launch, "build_datasets", bad_data)
    cfg = run_cfg(scaling={"num_workers": 1})
    with pytest.raises(DataError, match="9 of 10 rows quarantined"):
        train(cfg, log=lambda m: None)
    assert fits == [True]  # Ray Train was started alongside the data stage, from a thread
    assert not [t for t in threading.enumerate() if t.name.startswith("raydpo-fit")]  # and it ended
    assert not list(cfg.run_dir.glob("**/checkpoint_*"))  # no step ran


@pytest.mark.ray
def test_with_ray_train_starting_the_reference_is_scored_here_not_by_an_actor_that_would_wait(
    ray_local, run_cfg, monkeypatch
):
    """Ray Train, started alongside the data stage, holds the CPUs that a scoring actor would ask for:
    `train.reference_workers: auto` then scores in the driver even where it would pick an actor."""
    from raydpo.engine import reference
    from raydpo.methods import train

    monkeypatch.setattr(reference, "SMALL_SCORING", 0)  # auto alone would start an actor
    lines: list[str] = []
    cfg = run_cfg(scaling={"num_workers": 1}, train={"precompute_reference": True, "max_steps": 2})
    out = train(cfg, log=lines.append)
    assert [h["step"] for h in out["history"] if "loss" in h] == [1, 2]
    computed = [x for x in lines if x.startswith("reference log-probs: computed")]
    assert len(computed) == 1 and "(in this process)" in computed[0], lines


def test_what_a_raylet_started_and_outlived_its_shutdown_is_ended_and_nothing_else(tmp_path):
    """Ray 2.60's workers can hang in their own exit handler after Ray shut down; end_leftovers kills
    exactly the processes whose environment names the raylet (RAY_RAYLET_PID), after a grace period."""
    import os

    from raydpo.engine.session import end_leftovers, spawned_by

    fake = 2**22 + 12345  # above any pid here: no real raylet has it
    env = {**os.environ, "RAY_RAYLET_PID": str(fake)}
    ours = subprocess.Popen(["sleep", "60"], env=env)
    plain = {k: v for k, v in os.environ.items() if k != "RAY_RAYLET_PID"}
    other = subprocess.Popen(["sleep", "60"], env=plain)
    try:
        assert spawned_by(fake) == [ours.pid]
        assert end_leftovers(fake, grace_s=0.3) == [ours.pid]
        assert ours.wait(timeout=10) == -9 and other.poll() is None
        assert end_leftovers(fake, grace_s=0.3) == []  # nothing left to end
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


def test_stop_ray_ends_the_leftovers_of_the_ray_it_shut_down(monkeypatch):
    """stop_ray reads the raylet's pid before Ray shuts down (it is gone after), then ends what that
    raylet started; a process that joined a cluster (no raylet of its own) only shuts down."""
    from raydpo.engine import session

    events = []
    monkeypatch.setattr(session.ray, "shutdown", lambda: events.append("shutdown"))
    monkeypatch.setattr(session, "end_leftovers", lambda pid: events.append(("end", pid)))
    for raylet, want in ((4321, ["shutdown", ("end", 4321)]), (None, ["shutdown"])):
        events.clear()
        monkeypatch.setattr(session, "raylet_pid", lambda r=raylet: events.append("pid") or r)
        session.stop_ray()
        assert events == ["pid", *want]
