"""One forward/backward over a batch, with gradient accumulation: a pure function of models and tensors.

`train_step` knows nothing of the method: the `Objective` maps (model, reference, micro-batch) to a
loss and metrics. Micro-batch losses are scaled by 1/accum_steps, so the summed gradient equals that
of the whole batch's mean loss. No Ray, no I/O.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from raydpo.engine.method import Metrics, Objective


def split_batch(batch: dict, parts: int, paired: bool = True) -> list[dict]:
    """Split a collated batch of B pairs (2B rows, or `collate_shared`'s B rows) or B single rows into
    `parts` micro-batches."""
    if parts == 1:
        return [batch]
    if "chosen_src" in batch:  # rows of whole pairs (`collate_shared`, packed or not)
        return [_trim_shared(_pairs_part(batch, k0, parts)) for k0 in range(parts)]
    b = batch["input_ids"].shape[0] // (2 if paired else 1)
    size = b // parts
    out = []
    for k in range(parts):
        sel = torch.arange(k * size, (k + 1) * size)
        if paired:  # chosen rows k·size… and their rejected rows b + k·size…
            sel = torch.cat([sel, torch.arange(b + k * size, b + (k + 1) * size)])
        pair_sel = torch.arange(k * size, (k + 1) * size)  # (B,) entries: precomputed reference log-probs
        out.append(_trim({key: v[pair_sel] if v.dim() == 1 else v[sel] for key, v in batch.items()}))
    return out


# `collate_shared`'s per-row tensors; every other entry of its batches is per pair
ROW_KEYS = ("input_ids", "attention_mask", "position_ids", "attention_mask_4d", "chosen_labels",
            "rejected_labels")  # fmt: skip


def _pairs_part(batch: dict, k: int, parts: int) -> dict:
    """Micro-batch `k` of `parts` of a `collate_shared` batch: its pairs, and the rows that hold them
    (packed batches pack each micro-batch's pairs into rows of their own, so those rows are
    consecutive)."""
    size = len(batch["chosen_mask"]) // parts
    pairs = slice(k * size, (k + 1) * size)
    if len(batch["input_ids"]) == len(batch["chosen_mask"]):  # a row per pair: a micro-batch's rows are
        #   its pairs' range (packed in another order, maybe), known without a host sync
        return {key: v[pairs] for key, v in batch.items()} | {"pair_row": batch["pair_row"][pairs] - k * size}
    rows = batch["pair_row"][pairs]
    lo, hi = int(rows.min()), int(rows.max()) + 1  # host sync, once per micro-batch
    out = {key: (v[lo:hi] if key in ROW_KEYS else v[pairs]) for key, v in batch.items()}
    out["pair_row"] = rows - lo
    return out


def _trim(mb: dict) -> dict:
    """Drop padding columns that no row of a micro-batch uses."""
    width = int(mb["attention_mask"].sum(-1).max())  # host sync, once per micro-batch
    return {k: (v[:, :width] if v.dim() == 2 else v) for k, v in mb.items()}


def _trim_shared(mb: dict) -> dict:
    """`_trim` for `collate_shared`'s layout: (B, T) columns, the (B, 1, T, T) mask, (B, R) columns."""
    width = int(mb["attention_mask"].sum(-1).max())  # host sync, once per micro-batch
    resp = int(torch.maximum(mb["chosen_mask"].sum(-1), mb["rejected_mask"].sum(-1)).max())
    out = {}
    for k, v in mb.items():
        if v.dim() == 1:  # per pair (precomputed reference log-probs)
            out[k] = v
        elif k == "attention_mask_4d":
            out[k] = v[:, :, :width, :width]
        elif k.endswith(("_src", "_tgt", "_mask")) and k != "attention_mask":
            out[k] = v[:, :resp]
        else:
            out[k] = v[:, :width]
    return out


def train_step(
    policy, reference, batch: dict, objective: Objective, accum_steps: int = 1, sync=None
) -> Metrics:
    """Forward + backward over `accum_steps` micro-batches; gradients accumulate in the policy. An
    objective's `batch_reference` first scores the whole batch under the reference, in one pass:
    larger matrix products than a pass per micro-batch, and nothing of it is alive while the policy's
    activations are.

    `sync(is_last)` returns a context manager (DDP's no_sync on all but the last micro-batch); None
    means no gradient synchronization to manage. Returns the metrics averaged over micro-batches.
    """
    totals: Metrics = {}
    if objective.batch_reference is not None:  # the reference once per batch, ahead of the policy
        batch = {**batch, **objective.batch_reference(policy, reference, batch)}
    micro = split_batch(batch, accum_steps, objective.paired)
    for i, mb in enumerate(micro):
        with sync(i == len(micro) - 1) if sync else nullcontext():
            loss, metrics = objective(policy, reference, mb)
            (loss / len(micro)).backward()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0) + v / len(micro)
    return totals
