"""Live progress lines on the driver, fed by rank 0 through a Ray queue; also keeps the step history.

The queue is an actor (a process of its own): a driver keeps an idle one and hands it to its next run
(`_acquire`/`_release`), so a sweep of in-process runs, the demo or a test session starts one such
process instead of one per run. Each run tags its lines, and a line of an earlier run that arrives late
is dropped.
"""

from __future__ import annotations

import sys
import threading
import time
import uuid

import ray
from ray.exceptions import RayError
from ray.util.queue import Empty, Full, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

_IDLE: dict[tuple[str, str], Queue] = {}  # (job, node) → a queue no run of this driver is using
_LOCK = threading.Lock()


def _key() -> tuple[str, str]:
    ctx = ray.get_runtime_context()
    return ctx.get_job_id(), ctx.get_node_id()  # a new Ray session (after ray.shutdown) has a new job


def _acquire() -> Queue:
    """This driver's idle queue, or a new one (the first run, or another run still holds the idle one)."""
    with _LOCK:
        queue = _IDLE.pop(_key(), None)
    if queue is not None:
        try:
            queue.empty()  # one call: is the actor still there?
            return queue
        except RayError:
            pass
    # num_cpus=0: the queue actor also fits inside a Tune trial's placement group. It lives on the
    # driver's node: losing a worker's node must not take the progress channel with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": here})


def _release(queue: Queue) -> None:
    with _LOCK:
        _IDLE.setdefault(_key(), queue)


class Progress:
    """`step 12/40  loss 0.512  acc 0.750  …  10.2 pairs/s  ETA 31s`, one line per logged step.

    `shown` lists (label, metric) pairs, the method's choice (Method.progress). Rank 0 sends on
    `channel` (the queue and this run's tag, for `sender`).
    """

    def __init__(self, total: int, shown: tuple[tuple[str, str], ...], stream=sys.stderr):
        self.queue, self.tag = _acquire(), uuid.uuid4().hex
        self.channel = (self.queue, self.tag)
        self.total, self.shown, self.stream = total, shown, stream
        self.history: list[dict] = []
        self._stop = threading.Event()
        self._start = time.monotonic()
        self._first = 0
        self.lost = False
        self._thread = threading.Thread(target=self._pump, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        self._drain()
        if not self.lost:
            _release(self.queue)

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._drain(timeout=0.5)

    def _drain(self, timeout: float = 0.0) -> None:
        if self.lost:
            return
        try:
            while True:
                item = self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
                if item.pop("_run", None) != self.tag:  # a late line of an earlier run on this queue
                    continue
                self.history.append(item)
                self.show(item)
        except Empty:
            return
        except RayError as e:  # progress is a view: the run goes on, its records are in MLflow
            self.lost = True
            print(f"progress lines stopped (queue lost: {type(e).__name__}); the run goes on",
                  file=self.stream or sys.stderr, flush=True)  # fmt: skip

    def show(self, m: dict) -> None:
        if self.stream is None:
            return
        step = m["step"]
        if not self.history[:-1]:  # first line: time from here on, not Ray's start-up
            self._start, self._first = time.monotonic(), step
        done = step - self._first
        rate = (time.monotonic() - self._start) / done if done else 0.0
        extra = "".join(f"  {label} {m[k]:.3f}" for label, k in self.shown if k in m)
        speed = f"  {m['pairs_per_second']:.1f} pairs/s" if "pairs_per_second" in m else ""
        eta = rate * (self.total - step)
        print(f"step {step}/{self.total}{extra}{speed}  ETA {eta:.0f}s", file=self.stream, flush=True)


def sender(channel: tuple[Queue, str]):
    """Rank 0's side of `Progress.channel`: best effort, a full or lost queue never stops training."""
    queue, tag = channel

    def put(item: dict) -> None:
        try:
            queue.put_nowait({**item, "_run": tag})
        except (Full, RayError):
            pass

    return put
