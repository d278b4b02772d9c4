"""Length-grouped batches (`train.group_by_length`): the grouping itself, the single-process source,
and the Ray shard source that training workers use; micro-batches cut from width-sorted pairs."""

import random

import pytest

from raydpo.data.tokenize import TokenizedPair
from raydpo.engine.sources import (
    GROUP_WINDOW,
    ListSource,
    grouped_batches,
    micro_batch_order,
    pair_length,
    row_width,
)
from raydpo.engine.step import split_batch


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


def test_micro_batch_order_by_hand():
    """Widths in the shared layout 9, 3, 7, 3 (prompt + chosen + rejected): two micro-batches take
    pairs [1, 3] (ties keep their order) and [2, 0]; one micro-batch keeps the batch as it is."""
    lens = [(3, 3, 3), (1, 1, 1), (3, 2, 2), (1, 1, 1)]
    pairs = [TokenizedPair([1] * p, [2] * c, [3] * r, f"p{i}") for i, (p, c, r) in enumerate(lens)]
    assert [row_width(p, "shared") for p in pairs] == [9, 3, 7, 3]
    assert micro_batch_order(pairs, 2, "shared") == [1, 3, 2, 0]
    assert micro_batch_order(pairs, 1, "shared") == [0, 1, 2, 3]
    wide = TokenizedPair([1] * 2, [2] * 5, [3] * 1)
    assert (row_width(wide, "pairs"), row_width(wide, "texts"), row_width(wide, "packed")) == (7, 7, 8)


def test_micro_batches_pad_less_and_keep_each_batch():
    """With 4 micro-batches a batch holds the same pairs as with one, sorted by width, and its
    micro-batches pad less; the pair ids name the rows they sit in."""
    pairs = _pairs(64, seed=2)
    by_id = {p.id: p for p in pairs}
    one = list(ListSource(pairs, 8, 0, 0, "shared", "cpu").epoch(0))
    four = list(ListSource(pairs, 8, 0, 0, "shared", "cpu", groups=4).epoch(0))
    assert [sorted(b["ids"]) for b in one] == [sorted(b["ids"]) for b in four]
    for b in four:
        widths = [row_width(by_id[i], "shared") for i in b["ids"]]
        assert widths == sorted(widths)
        assert b["attention_mask"].sum(-1).tolist() == widths  # row j holds pair ids[j]

    def micro_padding(batches):
        return sum(_padding(split_batch({k: v for k, v in b.items() if k != "ids"}, 4)) for b in batches)

    assert micro_padding(four) < 0.5 * micro_padding(one)  # `one`'s batches cut as they come


def test_worker_collate_moves_ids_and_reference_columns_with_their_pairs():
    """A Ray Train worker's collate (rank 1 of 2, batch 4 each, 2 micro-batches): its pairs are sorted by
    width and their ids and precomputed reference log-probs follow them."""
    import numpy as np

    from raydpo.engine.worker import make_collate

    lens = [(2, 2, 2), (1, 1, 1), (5, 4, 4), (1, 2, 1), (3, 1, 1), (6, 6, 6), (1, 1, 2), (2, 1, 1)]
    col = lambda f: np.array([np.array(f(i, lp), dtype=np.int64) for i, lp in enumerate(lens)], dtype=object)
    batch = {
        "id": np.array([f"p{i}" for i in range(8)], dtype=object),
        "prompt_ids": col(lambda i, lp: [100 + i] * lp[0]),
        "chosen_ids": col(lambda i, lp: [200 + i] * lp[1]),
        "rejected_ids": col(lambda i, lp: [300 + i] * lp[2]),
        "ref_chosen": -np.arange(8, dtype=np.float64),
        "ref_rejected": -np.arange(8, dtype=np.float64) - 0.5,
    }
    out = make_collate(rank=1, per_worker=4, pad_id=0, layout="shared", groups=2)(batch)
    # rank 1 holds pairs 4..7 of widths 5, 18, 4, 4: sorted (stable) 6, 7, 4, 5
    assert out["ids"] == ["p6", "p7", "p4", "p5"]
    assert out["input_ids"][:, 0].tolist() == [106, 107, 104, 105]
    assert out["ref_chosen"].tolist() == [-6.0, -7.0, -4.0, -5.0]
    assert out["ref_rejected"].tolist() == [-6.5, -7.5, -4.5, -5.5]
    unsorted = make_collate(rank=1, per_worker=4, pad_id=0, layout="shared", groups=1)(batch)
    assert unsorted["ids"] == ["p4", "p5", "p6", "p7"]


def test_list_source_hands_out_each_pairs_reference_values_with_it():
    """A single-process source given precomputed reference log-probs: in every batch (shuffled,
    length-grouped, cut into width-sorted micro-batches) row j's values are those of the pair `ids[j]`
    names; a column of the wrong length is refused."""
    import torch

    pairs = _pairs(48, seed=3)
    index = {p.id: i for i, p in enumerate(pairs)}
    ref = {"ref_chosen": -torch.arange(48, dtype=torch.float32),
           "ref_rejected": -torch.arange(48, dtype=torch.float32) - 0.25}  # fmt: skip
    for kwargs in ({}, {"groups": 4}, {"groups": 2, "group_by_length": True}):
        source = ListSource(pairs, 8, 1, 0, "shared", "cpu", reference=ref, **kwargs)
        batches = list(source.epoch(0, shuffle=True))
        assert len(batches) == 6
        for b in batches:
            rows = [index[i] for i in b["ids"]]
            assert b["ref_chosen"].tolist() == [-float(r) for r in rows], kwargs
            assert b["ref_rejected"].tolist() == [-r - 0.25 for r in rows], kwargs
            assert b["attention_mask"].sum(-1).tolist() == [row_width(pairs[r], "shared") for r in rows]
        assert sorted(i for b in batches for i in b["ids"]) == sorted(index)
    with pytest.raises(ValueError, match="ref_rejected"):
        ListSource(pairs, 8, 1, 0, "shared", "cpu", reference={"ref_rejected": torch.zeros(47)})
