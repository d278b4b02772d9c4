"""Where a worker's batches come from, per epoch: the same interface for Ray shards and plain lists.

A source's `epoch(e, shuffle)` yields this worker's full batches of epoch `e` in a seeded order, so a
resumed run can skip the batches it already trained on. Pairs and texts come as collated tensors
(`data.tokenize.collate_batch`, in the layout the trainer chose); prompts (on-policy methods) as
lists of strings.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Protocol

import torch

from raydpo.data.tokenize import Layout, TokenizedPair, collate_batch


class BatchSource(Protocol):
    def epoch(self, epoch: int, shuffle: bool = True) -> Iterator: ...


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


GROUP_WINDOW = 64  # global batches per window of `train.group_by_length`


def pair_length(prompt, chosen, rejected) -> int:
    """The padded row length a pair needs in the two-row layout: prompt + the longer response."""
    return len(prompt) + max(len(chosen), len(rejected))


def grouped_batches(lengths: list[int], batch: int, rng: random.Random) -> list[list[int]]:
    """One window of rows (positions 0 … n−1, in the epoch's seeded order) as full batches of rows of
    similar length (`train.group_by_length`): the rows past the last full batch are dropped (as
    drop_last does), the rest sorted by length (stable, so ties keep the seeded order) and cut into
    batches, and the batches shuffled with `rng`. Each batch then pads to nearly its own rows' length."""
    keep = len(lengths) - len(lengths) % batch
    order = sorted(range(keep), key=lengths.__getitem__)
    batches = [order[i : i + batch] for i in range(0, keep, batch)]
    rng.shuffle(batches)
    return batches


def row_width(pair, layout: Layout) -> int:
    """The padded width a pair needs in `layout` (data.tokenize.collate_batch)."""
    if layout in ("shared", "packed"):
        return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
    if layout == "texts":
        return len(pair.prompt_ids) + len(pair.chosen_ids)
    return pair_length(pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)


def micro_batch_order(pairs: list, groups: int, layout: Layout) -> list[int]:
    """The order in which a batch's pairs are cut into `groups` gradient-accumulation micro-batches:
    by the width each needs (stable), so a micro-batch pads only to its own pairs' longest. The batch
    and its update are the same in any order (gradients are summed over micro-batches; only float
    rounding differs); one group keeps the order as it is."""
    if groups == 1:
        return list(range(len(pairs)))
    return sorted(range(len(pairs)), key=lambda i: row_width(pairs[i], layout))


def to_device(batch: dict, device) -> dict:
    """Tensors to `device`; other entries (the pair ids) as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class ListSource:
    """Tokenized pairs held in this process (the single-process path): a seeded permutation per epoch,
    the last incomplete batch dropped (every step sees `batch_size` pairs); with `group_by_length`,
    each window of GROUP_WINDOW batches regrouped by length (`grouped_batches`). `reference`: each
    pair's precomputed reference log-probs (`{"ref_chosen": (N,), "ref_rejected": (N,)}`, float32),
    handed out with its pair as a Ray worker's batches carry the cache's columns."""

    def __init__(
        self, pairs: list[TokenizedPair], batch_size: int, seed: int, pad_id: int, layout: Layout, device,
        group_by_length: bool = False, groups: int = 1, reference: dict[str, torch.Tensor] | None = None,
    ):  # fmt: skip
        self.pairs, self.batch_size, self.seed, self.pad_id = pairs, batch_size, seed, pad_id
        self.layout, self.device, self.group, self.groups = layout, device, group_by_length, groups
        self.reference = reference or {}
        for k, v in self.reference.items():
            if v.shape != (len(pairs),):
                raise ValueError(f"reference column {k!r} has shape {tuple(v.shape)}, not ({len(pairs)},)")

    def batches(self, epoch: int, shuffle: bool) -> Iterator[list[int]]:
        """This epoch's batches as lists of row positions."""
        order = list(range(len(self.pairs)))
        if shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(len(self.pairs), generator=g).tolist()
        if not self.group:
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size):
                yield order[i : i + self.batch_size]
            return
        rng, span = random.Random(epoch_seed(self.seed, epoch)), self.batch_size * GROUP_WINDOW
        for w in range(0, len(order), span):
            window = order[w : w + span]
            lengths = [
                pair_length(p.prompt_ids, p.chosen_ids, p.rejected_ids)
                for p in map(self.pairs.__getitem__, window)
            ]
            for b in grouped_batches(lengths, self.batch_size, rng):
                yield [window[k] for k in b]

    def epoch(self, epoch: int, shuffle: bool = True) -> Iterator[dict]:
        for rows in self.batches(epoch, shuffle):
            group = [self.pairs[j] for j in rows]
            rows = [rows[i] for i in micro_batch_order(group, self.groups, self.layout)]
            group = [self.pairs[j] for j in rows]
            batch = collate_batch(group, self.pad_id, self.layout, self.groups)
            ref = {k: v[rows] for k, v in self.reference.items()}
            yield to_device({**batch, **ref, "ids": [p.id for p in group]}, self.device)


class PromptSource:
    """Prompts for on-policy methods: each step draws `batch_size` prompts with replacement, seeded by
    (seed, global step, rank), so workers see different prompts and a resumed run draws the same ones."""

    def __init__(
        self, prompts: list[str], batch_size: int, steps_per_epoch: int, seed: int, rank: int, world: int
    ):
        self.prompts, self.batch_size, self.per_epoch = prompts, batch_size, steps_per_epoch
        self.seed, self.rank, self.world = seed, rank, world

    def epoch(self, epoch: int, shuffle: bool = True) -> Iterator[list[str]]:
        for k in range(self.per_epoch):
            it = epoch * self.per_epoch + k
            rng = random.Random(epoch_seed(self.seed, it * self.world + self.rank))
            yield [self.prompts[rng.randrange(len(self.prompts))] for _ in range(self.batch_size)]
