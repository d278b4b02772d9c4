"""Data parallelism for the Ray Train workers: DDP (gloo on CPU, NCCL on GPU) or FSDP2, and bf16.

Everything here also works in a single process without torch.distributed (world size 1).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext

import ray.train.torch
import torch
import torch.distributed as dist

from raydpo.config import ScalingConfig

# FSDP2's API and the distributed state-dict helpers are imported where they are used: the helpers take
# about half a second to import in every Ray Train worker, and a DDP or single-worker run never uses them.


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def use_bf16(scaling: ScalingConfig, device: torch.device) -> bool:
    if scaling.precision == "bf16":
        return True
    return scaling.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(scaling: ScalingConfig, device: torch.device):
    """bf16 autocast for DDP on hardware that has it; FSDP2 casts through its own policy instead."""
    if scaling.strategy == "fsdp" or not use_bf16(scaling, device):
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _decoder_layers(model) -> list[torch.nn.Module]:
    """Transformer blocks to shard one by one (Llama/Qwen `layers`, GPT-2 `h`)."""
    for m in model.modules():
        for name in ("layers", "h"):
            blocks = getattr(m, name, None)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
                return list(blocks)
    return []


def _fsdp(model, scaling: ScalingConfig, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = use_bf16(scaling, device)
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    model.to(device)
    for block in _decoder_layers(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def prepare(policy, reference, scaling: ScalingConfig):
    """Move models to this Ray Train worker's device and wrap the policy (DDP or FSDP2)."""
    device = ray.train.torch.get_device()
    if scaling.strategy == "fsdp" and _initialized():
        policy = _fsdp(policy, scaling, device)
        if reference is not None:
            reference = _fsdp(reference, scaling, device)
    else:
        policy = ray.train.torch.prepare_model(policy)  # DDP when world size > 1
        if reference is not None:
            reference.to(device)
    return policy, reference, device


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def has_adapters(model) -> bool:
    """Whether `model` (DDP-wrapped or not) is a peft model: its base with the adapters off is then
    the reference when a run has `model.lora` and no `model.reference`."""
    return hasattr(unwrap(model), "disable_adapter")


@contextmanager
def adapters_off(model):
    """Yield the peft model under `model` (unwrapped from DDP, where the adapters sit) with its
    adapters disabled, so its forward runs the base model; they are on again on exit."""
    base = unwrap(model)
    with base.disable_adapter():
        yield base


def no_sync_factory(model):
    """For gradient accumulation under DDP: skip the all-reduce on all but the last micro-batch."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    return lambda is_last: nullcontext() if is_last else model.no_sync()


def mean_across_workers(metrics: dict) -> dict[str, float]:
    """Average 0-d metric tensors over workers with one all-reduce; return floats (a host sync)."""
    keys = sorted(metrics)
    vec = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32).detach().reshape(()) for k in keys])
    if _initialized() and dist.get_world_size() > 1:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        vec = vec.to(backend_device)
        dist.all_reduce(vec)
        vec = vec / dist.get_world_size()
    return dict(zip(keys, vec.cpu().tolist()))


def _is_fsdp(model) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no model of this process is sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def full_states(policy, opt) -> tuple[dict | None, dict]:
    """(model state or None for "use save_pretrained's own", optimizer state) for a checkpoint.

    Under FSDP2 both are gathered to full, CPU-offloaded tensors; this is a collective, so every
    rank calls it. Under DDP every rank holds the same state already.
    """
    if not _is_fsdp(policy):
        return None, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(policy, opt, options=opts)
    return model_state, optim_state


def load_optimizer_state(policy, opt, state: dict) -> None:
    if not _is_fsdp(policy):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        policy, opt, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    )
