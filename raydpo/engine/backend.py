"""The torch process group of a Ray Train run, set up without importing torch in Ray's controller.

Ray Train's `TorchConfig` lives in a module that imports torch, and the run's controller actor
unpickles the backend config: every `TorchTrainer.fit` then spent 3–5 s of the controller's start
(on the path to the first step) and about 6 CPU-seconds importing torch in a process that never
runs it. `ProcessGroupConfig` is the same config in a module without torch; its backend asks the
workers, which import torch anyway, to run Ray's own `ray.train.torch.config` functions: the same
environment (MASTER_ADDR/PORT, LOCAL_RANK, WORLD_SIZE, …) and the same `init_process_group` call,
gloo on CPU workers and NCCL on GPU workers, as Ray's `_TorchBackend` (TPUs are not supported).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray
from ray._private import ray_constants
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig
from ray.train.constants import (
    DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
    TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S,
)
from ray.train.v2._internal.util import TrainingFramework

logger = logging.getLogger(__name__)


@dataclass
class ProcessGroupConfig(BackendConfig):
    """What `TorchTrainer(torch_config=...)` takes: Ray's `TorchConfig` fields, `init_method` "env"."""

    backend: str | None = None  # None: TorchTrainer picks "nccl" with GPUs, else "gloo"
    timeout_s: int = 1800

    @property
    def backend_cls(self):
        return ProcessGroupBackend

    @property
    def train_func_context(self):  # read on the driver, run on the workers: sets the CUDA device
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class ProcessGroupBackend(Backend):
    """Ray's `_TorchBackend.on_start`/`on_shutdown` for CPU and GPU workers, run from the controller."""

    share_cuda_visible_devices: bool = True  # workers of a node see each other's GPUs (for NCCL)

    def on_start(self, worker_group, backend_config: ProcessGroupConfig):
        from ray.train._internal.utils import get_address_and_port

        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        addr, port = worker_group.execute_single(0, get_address_and_port)
        n = len(worker_group)
        ray.get([
            worker_group.execute_single_async(
                rank, _join, backend=backend, addr=addr, port=port, world_rank=rank, world_size=n,
                timeout_s=backend_config.timeout_s,
            )
            for rank in range(n)
        ])  # fmt: skip

    def on_shutdown(self, worker_group, backend_config):
        futures = worker_group.execute_async(_leave, destroy=len(worker_group) > 1)
        timeout_s = ray_constants.env_integer(
            TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S, DEFAULT_TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S
        )
        try:
            ray.get(futures, timeout=timeout_s)
        except GetTimeoutError:
            logger.warning("torch process group shutdown timed out after %s s", timeout_s)


def _join(backend: str, addr: str, port: int, world_rank: int, world_size: int, timeout_s: int) -> None:
    """On a worker: the rendezvous address, Ray's distributed environment, then the process group."""
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

    os.environ["MASTER_ADDR"] = addr
    os.environ["MASTER_PORT"] = str(port)
    _set_torch_distributed_env_vars()
    _setup_torch_process_group(
        backend=backend,
        world_rank=world_rank,
        world_size=world_size,
        init_method="env://",
        timeout_s=timeout_s,
    )


def _leave(destroy: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy_process_group=destroy)
