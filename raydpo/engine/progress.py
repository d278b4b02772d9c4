"""Live progress lines on the driver, fed by rank 0 through a channel actor; also keeps the step
history. The same channel carries a run's inputs the other way when the driver prepares them while
Ray Train starts (`post` / `fetch`, engine/launch.py).

The channel is an actor (a process of its own): a driver keeps an idle one and hands it to its next
run (`_acquire`/`_release`), so a sweep of in-process runs, the demo or a test session starts one such
process instead of one per run. Each run tags its lines and inputs, and a line of an earlier run that
arrives late is dropped.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import uuid

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

LINES = 10_000  # lines the channel holds for the driver; rank 0's next lines are dropped beyond it


class Channel:
    """The actor: lines up (rank 0 → driver, best effort), each run's inputs down (driver → every
    worker of the run, any number of times: a restarted worker group fetches them again)."""

    def __init__(self, maxsize: int = LINES):
        self.lines: asyncio.Queue = asyncio.Queue(maxsize)
        self.posted: dict[str, list] = {}
        self.ready: dict[str, asyncio.Event] = {}

    def put(self, item: dict) -> None:
        if not self.lines.full():
            self.lines.put_nowait(item)

    async def take(self, timeout: float) -> list[dict]:
        """Every line waiting; when none is, the first to arrive within `timeout` s (and any after it)."""
        out = []
        if self.lines.empty() and timeout > 0:
            try:
                out.append(await asyncio.wait_for(self.lines.get(), timeout))
            except asyncio.TimeoutError:
                return []
        while not self.lines.empty():
            out.append(self.lines.get_nowait())
        return out

    def _event(self, tag: str) -> asyncio.Event:
        return self.ready.setdefault(tag, asyncio.Event())

    def post(self, tag: str, value: list) -> None:
        """`value`: [an ObjectRef, or None when the run stopped before training] (in a list, so that
        the reference is passed on, not resolved here)."""
        self.posted[tag] = value
        self._event(tag).set()

    async def fetch(self, tag: str) -> list:
        await self._event(tag).wait()
        return self.posted[tag]

    def forget(self, tag: str) -> None:
        self.posted.pop(tag, None)
        self.ready.pop(tag, None)

    def ping(self) -> bool:
        return True


_IDLE: dict[tuple[str, str], ray.actor.ActorHandle] = {}  # (job, node) → a channel no run is using
_LOCK = threading.Lock()


def _key() -> tuple[str, str]:
    ctx = ray.get_runtime_context()
    return ctx.get_job_id(), ctx.get_node_id()  # a new Ray session (after ray.shutdown) has a new job


def _acquire() -> ray.actor.ActorHandle:
    """This driver's idle channel, or a new one (the first run, or another run still holds the idle one)."""
    with _LOCK:
        actor = _IDLE.pop(_key(), None)
    if actor is not None:
        try:
            ray.get(actor.ping.remote())  # is the actor still there?
            return actor
        except RayError:
            pass
    # num_cpus=0: the actor also fits inside a Tune trial's placement group. It lives on the driver's
    # node: losing a worker's node must not take the progress channel with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(Channel).options(num_cpus=0, scheduling_strategy=here).remote()


def _release(actor: ray.actor.ActorHandle) -> None:
    with _LOCK:
        _IDLE.setdefault(_key(), actor)


class Progress:
    """`step 12/40  loss 0.512  acc 0.750  …  10.2 pairs/s  ETA 31s`, one line per logged step.

    `shown` lists (label, metric) pairs, the method's choice (Method.progress). Rank 0 sends on
    `channel` (the channel actor and this run's tag, for `sender` and `fetch`).
    """

    def __init__(self, total: int | None, shown: tuple[tuple[str, str], ...], stream=sys.stderr):
        self.actor, self.tag = _acquire(), uuid.uuid4().hex
        self.channel = (self.actor, self.tag)
        self.total, self.shown, self.stream = total, shown, stream  # total: set before step 1 at the latest
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
            try:
                self.actor.forget.remote(self.tag)
            except RayError:
                return
            _release(self.actor)

    def post(self, inputs: dict | None) -> ray.ObjectRef | None:
        """Hand this run's workers `inputs` (None: the run stopped before training). Returns the
        object reference, which the caller keeps until the run ends."""
        ref = None if inputs is None else ray.put(inputs)
        ray.get(self.actor.post.remote(self.tag, [ref]))
        return ref

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._drain(timeout=0.5)

    def _drain(self, timeout: float = 0.0) -> None:
        if self.lost:
            return
        try:
            items = ray.get(self.actor.take.remote(timeout))
        except RayError as e:  # progress is a view: the run goes on, its records are in MLflow
            self.lost = True
            print(f"progress lines stopped (channel lost: {type(e).__name__}); the run goes on",
                  file=self.stream or sys.stderr, flush=True)  # fmt: skip
            return
        for item in items:
            if item.pop("_run", None) != self.tag:  # a late line of an earlier run on this channel
                continue
            self.history.append(item)
            self.show(item)

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
        of, eta = (f"/{self.total}", f"  ETA {rate * (self.total - step):.0f}s") if self.total else ("", "")
        print(f"step {step}{of}{extra}{speed}{eta}", file=self.stream, flush=True)


def sender(channel: tuple[ray.actor.ActorHandle, str]):
    """Rank 0's side of `Progress.channel`: best effort (a full or lost channel never stops
    training); each line waits for the actor to take it, so a run's last line is there before the
    run ends."""
    actor, tag = channel

    def put(item: dict) -> None:
        try:
            ray.get(actor.put.remote({**item, "_run": tag}))
        except RayError:
            pass

    return put


def fetch(channel: tuple[ray.actor.ActorHandle, str]) -> dict | None:
    """A worker's side of `Progress.post`: waits for the run's inputs; None when the run stopped
    before training."""
    actor, tag = channel
    (ref,) = ray.get(actor.fetch.remote(tag))
    return None if ref is None else ray.get(ref)
