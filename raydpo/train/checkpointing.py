"""Checkpoints: the model in Hugging Face layout plus the trainer state, written atomically.

Layout of one checkpoint directory:
    model/               save_pretrained of the policy (a LoRA adapter when training LoRA)
    trainer_state.pt     optimizer, scheduler, RNG states, data position, MLflow run id
The trainer state is loaded with `weights_only=True`: nothing is unpickled beyond tensors and
plain Python values.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict:
    import numpy as np

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
    import numpy as np

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
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def load_trainer_state(directory: Path) -> dict:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
