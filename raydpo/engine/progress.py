"""Live progress lines on the driver, fed by rank 0 through a Ray queue; also keeps the step history."""

from __future__ import annotations

import sys
import threading
import time

import ray
from ray.exceptions import RayError
from ray.util.queue import Empty, Full, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


class Progress:
    """`step 12/40  loss 0.512  acc 0.750  …  10.2 pairs/s  ETA 31s`, one line per logged step.

    `shown` lists (label, metric) pairs, the method's choice (Method.progress).
    """

    def __init__(self, total: int, shown: tuple[tuple[str, str], ...], stream=sys.stderr):
        # num_cpus=0: the queue actor also fits inside a Tune trial's placement group. It lives on the
        # driver's node: losing a worker's node must not take the progress channel with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0, "scheduling_strategy": here})
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

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._drain(timeout=0.5)

    def _drain(self, timeout: float = 0.0) -> None:
        if self.lost:
            return
        try:
            while True:
                item = self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
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


def sender(queue: Queue):
    """Rank 0's side of the channel: best effort, a full or lost queue never stops training."""

    def put(item: dict) -> None:
        try:
            queue.put_nowait(item)
        except (Full, RayError):
            pass

    return put
