"""Checkpoints: the model in Hugging Face layout plus the trainer state, written atomically.

Layout of one checkpoint directory:
    model/               save_pretrained of the policy (a LoRA adapter when training LoRA; PPO adds
                         its value head as value_head.safetensors)
    trainer_state.pt     optimizer, scheduler, RNG states, data position, MLflow run id, and the
                         method's own state (PPO: the KL coefficient)
The trainer state is loaded with `weights_only=True`: nothing is unpickled beyond tensors and
plain Python values.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    target: Path, model, model_state: dict | None, optimizer_state: dict, scheduler, position: dict
) -> Path:
    """Write a checkpoint into `target` via a sibling temp dir and a rename."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    model.save_pretrained(tmp / "model", state_dict=model_state)
    state = {
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        **position,
    }
    torch.save(state, tmp / STATE_FILE)
    return publish_dir(tmp, target)


def load_checkpoint(directory: Path) -> tuple[dict, Path]:
    """(trainer state, the model directory) of a checkpoint; nothing beyond tensors and plain values
    is unpickled (`weights_only=True`)."""
    directory = Path(directory)
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True), directory / "model"


def publish_dir(tmp: Path, target: Path) -> Path:
    """Move a fully written directory `tmp` to `target`, replacing an older one."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
