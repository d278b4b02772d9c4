"""The Ray session of a driver: join RAY_ADDRESS or start a quiet local Ray bound to 127.0.0.1.

Every command that needs Ray (train, sweep, eval, demo) starts it here, once.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlparse

import ray
from ray.exceptions import AuthenticationError

from raydpo.errors import UserError


def check_ray_address(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast when RAY_ADDRESS names a host:port that does not accept connections."""
    if not address or address in ("auto", "local"):
        return
    url = urlparse(address if "://" in address else f"ray://{address}")
    host, port = url.hostname, url.port or (10001 if url.scheme == "ray" else 6379)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(
            f"RAY_ADDRESS={address}: cannot connect to {host}:{port} ({e.strerror or e})"
        ) from None


# What a Ray on one machine, started by this process, runs without (see local_ray_env).
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "RAY_enable_metrics_collection": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_task_events_report_interval_ms": "0",
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
}


def local_ray_env() -> None:
    """Settings for a Ray on one machine, started by this process (LOCAL_RAY_ENV, set before ray.init,
    so every Ray process inherits them; a user's own values stand):
    - nothing drains or preempts one local node, and Ray Train's preemption watcher would be one more
      actor process per run (about 1.7 CPU-seconds, on the path to the first step);
    - Ray Data's parquet reader starts 32 footer-reading actors per read by default, each a new
      process: that was most of a small streamed run's time (4 steps, 2 workers: 63 s -> 37 s with one);
    - a local run starts no dashboard, so nothing reads Ray's and Ray Train's metrics or the task
      events every Ray process sends each second (the state API's `ray list tasks`), and with
      `log_to_driver` off nothing reads what the log monitor collects: it lists the log folder every
      0.5 s instead of every 0.1 s. Together that took about 7% off a step of `raydpo bench`'s short
      shape and 4 of a run's 66 CPU-seconds here (README, "Throughput").
    """
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


@contextmanager
def ray_below_training():
    """Processes started inside this block (a local Ray: GCS, raylet and every worker it forks)
    run under SCHED_BATCH; this thread's own policy is back on exit.

    Every Ray worker process wakes about 100 times a second (Ray's own 10 ms signal check), and on a
    machine whose cores the training threads keep busy each wakeup preempted one of them: about 650
    preemptions a second on each of a worker's two torch threads in `raydpo bench`, stalling the
    other at its next barrier. A SCHED_BATCH process does not preempt on wakeup; it runs at the next
    scheduler tick and keeps its fair share of the CPU. The Ray Train worker's training thread takes
    SCHED_OTHER back (`take_cpu_back`), so its torch threads are the only ones left that preempt.
    Linux only, and nothing is changed where the system refuses it.
    """
    try:
        old = os.sched_getscheduler(0)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or not allowed here
        old = None
    try:
        yield
    finally:
        if old is not None:
            os.sched_setscheduler(0, old, os.sched_param(0))


def take_cpu_back() -> None:
    """In a process started under `ray_below_training`: this thread (and the torch threads it starts
    from now on) back to SCHED_OTHER, the policy that preempts batch processes on wakeup."""
    try:
        if os.sched_getscheduler(0) == os.SCHED_BATCH:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def raylet_pid() -> int | None:
    """The pid of the raylet that this process's `ray.init` started (None when it joined a cluster)."""
    node = getattr(ray._private.worker, "_global_node", None)
    try:
        return next(p.pid for kind, p in node.live_processes() if kind == "raylet")
    except (AttributeError, StopIteration):
        return None


def spawned_by(raylet: int) -> list[int]:
    """Live processes that the raylet `raylet` started: Ray sets RAY_RAYLET_PID in each worker's
    environment (Linux: read from /proc)."""
    tag, found = f"RAY_RAYLET_PID={raylet}".encode(), []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if tag in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:  # gone, or not ours to read
                continue
    return found


def end_leftovers(raylet: int, grace_s: float = 3.0) -> list[int]:
    """Kill what a raylet started and what outlived its Ray's shutdown; returns their pids.

    Ray 2.60's worker can deadlock in its own exit handler (CoreWorkerProcess::HandleAtExit: a pubsub
    reply posted to the io_context it is shutting down), most often a finished run's TrainController.
    It then sleeps forever holding about 230 MB, and outlives the raylet with parent 1. Only
    processes whose environment names this raylet are touched, after `grace_s` to exit on their own.
    """
    deadline = time.monotonic() + grace_s
    while (left := spawned_by(raylet)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def stop_ray() -> None:
    """`ray.shutdown()`; for a Ray this process started, then also what outlived it (`end_leftovers`).
    `start_ray` runs it at exit; code that stops its local Ray earlier calls it instead of
    `ray.shutdown()`."""
    raylet = raylet_pid()  # None once shut down, or when this process joined a cluster
    ray.shutdown()
    if raylet is not None:
        end_leftovers(raylet)


_stop_at_exit = False  # stop_ray registered with atexit (once per process)


def local_ray() -> bool:
    """Whether a run here uses a Ray on this machine that `start_ray` starts (no RAY_ADDRESS), not a
    cluster's: its CPUs are this machine's, and what it runs ends with it."""
    return not os.environ.get("RAY_ADDRESS")


def start_ray(min_cpus: float = 0) -> None:
    """Join RAY_ADDRESS, or start a local Ray on 127.0.0.1 with at least `min_cpus` logical CPUs
    (more slots than cores is fine: workers, data actors and controllers mostly take turns)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    check_ray_address(address)
    kwargs = {"logging_level": "WARNING", "log_to_driver": False, "include_dashboard": False}
    if not address:
        cpus = int(max(os.cpu_count() or 1, -(-min_cpus // 1)))
        kwargs.update(address="local", num_cpus=cpus, _node_ip_address="127.0.0.1")
        local_ray_env()
    try:
        with ray_below_training() if not address else nullcontext():
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, AuthenticationError) as e:
        if ray.is_initialized():
            ray.shutdown()
        if address and _is_auth_failure(e):
            raise UserError(_auth_message(address)) from None
        raise UserError(
            f"cannot start or join Ray ({address or 'local'}): {str(e).splitlines()[0]}"
        ) from None
    global _stop_at_exit
    if not address and not _stop_at_exit:
        atexit.register(stop_ray)  # runs before Ray's own atexit shutdown (registered at its import)
        _stop_at_exit = True
    quiet_ray()


# What Ray 2.60 says when a token is missing or wrong: AuthenticationError("Token authentication is
# enabled but no authentication token was found") when RAY_AUTH_MODE=token has no token; gRPC status
# UNAUTHENTICATED ("InvalidAuthToken: Authentication token is missing or incorrect", "Invalid or missing
# authentication token") inside "Failed to connect to GCS", under ConnectionError("Failed to connect to
# Ray cluster at ...") when the cluster wants a token the driver does not send.
_AUTH_HINTS = ("unauthenticated", "authentication token", "invalidauthtoken", "auth token")


def _is_auth_failure(e: BaseException) -> bool:
    """Whether `e` or an exception it was raised from is Ray rejecting (or missing) an auth token."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, AuthenticationError):
            return True
        text = " ".join(str(a) for a in e.args).lower()
        if any(h in text for h in _AUTH_HINTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _auth_message(address: str) -> str:
    mode = os.environ.get("RAY_AUTH_MODE", "")
    source = _token_source()
    if mode == "token" and source:
        return (
            f"cannot join Ray at {address}: the cluster rejected the token in {source}; "
            "use the cluster's token (ray get-auth-token on its head node)"
        )
    return (
        f"cannot join Ray at {address}: the cluster requires a token; set RAY_AUTH_MODE=token and put "
        "the token in RAY_AUTH_TOKEN or ~/.ray/auth_token (ray get-auth-token)"
    )


def _token_source() -> str | None:
    """Where Ray reads a token from, in its order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and Path(path).expanduser().is_file():
        return path
    default = Path.home() / ".ray" / "auth_token"
    return "~/.ray/auth_token" if default.is_file() else None


def quiet_ray() -> None:
    """Ray Data's per-dataset INFO lines and MLflow's store messages are noise on the console."""
    noisy = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic")
    noisy += ("ray.data._internal.execution.streaming_executor", "mlflow.store.db.utils")
    for name in noisy:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
