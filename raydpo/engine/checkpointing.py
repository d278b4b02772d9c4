"""Checkpoints: the model in Hugging Face layout plus the trainer state, written atomically.

Layout of one checkpoint directory:
    model/               save_pretrained of the policy (a LoRA adapter when training LoRA; PPO adds
                         its value head as value_head.safetensors)
    trainer_state.pt     optimizer, scheduler, RNG states, data position, MLflow run id, and the
                         method's own state (PPO: the KL coefficient)
    manifest.json        every file's size (and sha256 below 64 MiB), written last; `load_checkpoint`
                         verifies it, so a truncated or unfinished checkpoint is named, not loaded
The trainer state is loaded with `weights_only=True`: nothing is unpickled beyond tensors and
plain Python values.
"""

from __future__ import annotations

import hashlib
import json
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


MANIFEST = "manifest.json"
HASHED_BELOW = 64 << 20  # files under 64 MiB also get a sha256 in the manifest; larger ones their size


class CheckpointError(Exception):
    """A checkpoint directory that is incomplete or damaged (the message names it and what is wrong)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """manifest.json: every file's size (and sha256 when small), written last: a directory without it
    was never finished."""
    files = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = f.stat().st_size
        files[str(f.relative_to(directory))] = {
            "size": size,
            **({"sha256": _sha256(f)} if size < HASHED_BELOW else {}),
        }
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify(directory: Path) -> None:
    """Raise CheckpointError naming the directory and the first problem: no manifest (unfinished), a
    missing file, a wrong size or checksum."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{directory}: no readable {MANIFEST} (an unfinished checkpoint): {e}"
        ) from None
    for name, want in files.items():
        f = directory / name
        if not f.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if f.stat().st_size != want["size"]:
            raise CheckpointError(
                f"{directory}: {name} has {f.stat().st_size} bytes, expected {want['size']}"
            )
        if "sha256" in want and _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{directory}: {name} does not match its checksum")


def newest_intact(run_dir: Path, exclude: Path | None = None) -> Path | None:
    """The newest checkpoint directory under `run_dir` (Ray names them checkpoint_<timestamp>) that
    verifies, other than `exclude`."""
    for d in sorted(Path(run_dir).glob("checkpoint_*"), reverse=True):
        if d.is_dir() and (exclude is None or d.resolve() != Path(exclude).resolve()):
            try:
                verify(d)
                return d
            except CheckpointError:
                continue
    return None


def save_checkpoint(
    target: Path, model, model_state: dict | None, optimizer_state: dict, scheduler, position: dict
) -> Path:
    """Write a checkpoint into `target` via a sibling temp dir and a rename; the manifest goes last."""
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
    write_manifest(tmp)
    return publish_dir(tmp, target)


def load_checkpoint(directory: Path) -> tuple[dict, Path]:
    """(trainer state, the model directory) of a verified checkpoint; nothing beyond tensors and plain
    values is unpickled (`weights_only=True`). Raises CheckpointError for a damaged one."""
    directory = Path(directory)
    verify(directory)
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True), directory / "model"


def publish_dir(tmp: Path, target: Path) -> Path:
    """Move a fully written directory `tmp` to `target`. An older `target` is renamed aside and deleted
    only once the new one is in place: `target` is never half written, and no deletion happens before
    the replacement is complete (between the two renames the old copy is `<target>.old`)."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def usable(directory: Path, log=print) -> Path:
    """`directory` if it verifies, else the newest intact checkpoint beside it (reported by path);
    CheckpointError when there is none."""
    try:
        verify(directory)
        return directory
    except CheckpointError as e:
        fallback = newest_intact(Path(directory).parent, exclude=directory)
        if fallback is None:
            raise CheckpointError(f"{e}; no intact older checkpoint in {Path(directory).parent}") from None
        log(f"raydpo: {e}; resuming from {fallback.name}, the newest intact checkpoint")
        return fallback


def tidy_run_dir(run_dir: Path, log=print) -> None:
    """Before a run starts: report a damaged latest checkpoint (the workers fall back past it, see
    `usable`) and remove what an interruption left behind: temp/old copies and checkpoint folders
    that Ray never registered (in checkpoint_manager_snapshot.json) and that never got a manifest."""
    run_dir = Path(run_dir)
    for d in [*run_dir.glob("checkpoint_*.tmp"), *run_dir.glob("checkpoint_*.old")]:
        shutil.rmtree(d, ignore_errors=True)
        log(f"removed {d} (left by an interrupted write)")
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        listed = [r["checkpoint_dir_name"] for r in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no registered checkpoints (a new run), or a layout this check does not know
    for d in run_dir.glob("checkpoint_*"):
        if d.is_dir() and d.name not in listed and not (d / MANIFEST).exists():
            shutil.rmtree(d, ignore_errors=True)
            log(f"removed {d} (an unfinished checkpoint Ray never registered)")
    if listed:
        latest = run_dir / listed[-1]
        try:
            verify(latest)
        except CheckpointError as e:
            fallback = newest_intact(run_dir, exclude=latest)
            where = f"resuming from {fallback.name}" if fallback else "no intact checkpoint is left"
            log(f"raydpo: {e}; {where}")
