"""Length-grouped batches (`train.group_by_length`): the grouping itself, the single-process source,
and the Ray shard source that training workers use."""

import random

import pytest

from raydpo.data.tokenize import TokenizedPair
from raydpo.engine.sources import GROUP_WINDOW, ListSource, grouped_batches, pair_length


def test_pair_length_is_prompt_plus_the_longer_response():
    assert pair_length([1, 2, 3], [4], [5, 6]) == 5  # 3 + max(1, 2)


def test_grouped_batches_by_hand():
    """Lengths [5, 1, 4, 2, 3, 9, 7] in batches of 2: the 7th row (position 6, past the last full
    batch) is dropped; positions 0-5 sorted by length are 1, 3, 4, 2, 0, 5 (lengths 1, 2, 3, 4, 5, 9),
    cut into [1, 3], [4, 2], [0, 5]; the three batches are then shuffled."""
    out = grouped_batches([5, 1, 4, 2, 3, 9, 7], 2, random.Random(0))
    assert sorted(out) == [[0, 5], [1, 3], [4, 2]]
    assert out == grouped_batches([5, 1, 4, 2, 3, 9, 7], 2, random.Random(0))  # seeded
    orders = {
        tuple(map(tuple, grouped_batches([5, 1, 4, 2, 3, 9, 7], 2, random.Random(s)))) for s in range(8)
    }
    assert len(orders) > 1  # the batch order does change with the seed


def _pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)
    size = lambda lo, hi: rng.randint(lo, hi)
    return [TokenizedPair([1] * size(2, 40), [2] * size(1, 20), [3] * size(1, 20), f"p{i}") for i in range(n)]


def _padding(batches) -> int:
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches)


def test_list_source_groups_every_pair_once_with_less_padding():
    pairs = _pairs(4 * GROUP_WINDOW * 2 + 6)  # two full windows of batch 4 and 6 rows past them
    plain = ListSource(pairs, 4, 0, 0, "pairs", "cpu")
    grouped = ListSource(pairs, 4, 0, 0, "pairs", "cpu", group_by_length=True)
    a, b = list(plain.epoch(0)), list(grouped.epoch(0))
    assert len(a) == len(b) == 2 * GROUP_WINDOW + 1  # floor(n / 4) batches either way
    ids = [i for batch in b for i in batch["ids"]]
    assert len(set(ids)) == len(ids) == 4 * len(b)
    assert _padding(b) < 0.5 * _padding(a)
    assert [x["ids"] for x in grouped.epoch(0)] == [x["ids"] for x in b]  # the same again
    assert [x["ids"] for x in grouped.epoch(1)] != [x["ids"] for x in b]  # another epoch, another order


@pytest.mark.ray
def test_shard_source_groups_the_same_global_batches_for_every_rank(ray_local):
    """On one Ray Dataset: the slices of ranks 0 and 1 (world 2, batch 4) together are the batches of
    rank 0 in world 1 with batch 8, so grouping keeps 2 × 4 = 1 × 8; every pair once; less padding."""
    import ray

    from raydpo.engine.worker import ShardSource

    pairs = _pairs(8 * GROUP_WINDOW + 8, seed=1)
    ds = ray.data.from_items([{"id": p.id, "prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                               "rejected_ids": p.rejected_ids} for p in pairs]).materialize()  # fmt: skip
    one = list(ShardSource(ds, 8, 0, 0, 1, 0, "pairs", "cpu", group_by_length=True).epoch(0))
    r0 = list(ShardSource(ds, 4, 0, 0, 2, 0, "pairs", "cpu", group_by_length=True).epoch(0))
    r1 = list(ShardSource(ds, 4, 0, 1, 2, 0, "pairs", "cpu", group_by_length=True).epoch(0))
    assert len(one) == len(r0) == len(r1) == GROUP_WINDOW + 1
    assert [x["ids"] for x in one] == [a["ids"] + b["ids"] for a, b in zip(r0, r1)]
    ids = [i for x in one for i in x["ids"]]
    assert len(set(ids)) == len(ids) == len(pairs)
    plain = list(ShardSource(ds, 8, 0, 0, 1, 0, "pairs", "cpu").epoch(0))
    assert _padding(one) < 0.5 * _padding(plain)
