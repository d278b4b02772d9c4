"""The Ray session of a driver: join RAY_ADDRESS or start a quiet local Ray bound to 127.0.0.1.

Every command that needs Ray (train, sweep, eval, demo) starts it here, once.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

import ray

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
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError) as e:
        raise UserError(
            f"cannot start or join Ray ({address or 'local'}): {str(e).splitlines()[0]}"
        ) from None
    quiet_ray()


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
