"""MicroBatchSampler: dp split, exact resume, global batch numbering."""

import numpy as np
import pytest

from megamoe.data import MicroBatchSampler, collate, global_batch_indices, rank_micro_batches


def test_dp_ranks_partition_each_global_batch():
    total, mbs, dp = 100, 3, 4
    per_rank = [list(MicroBatchSampler(total, 0, mbs, r, dp)) for r in range(dp)]
    assert all(len(p) == total // (mbs * dp) == 8 for p in per_rank)
    for step in range(8):
        union = sorted(i for r in range(dp) for i in per_rank[r][step])
        assert union == list(range(step * 12, step * 12 + 12))
    assert per_rank[1][0] == [3, 4, 5]
    assert len(MicroBatchSampler(total, 0, mbs, 0, dp)) == 8


def test_accumulation_layout():
    # G = 12 = mbs 2 * dp 2 * 3 accumulation steps: rank r owns a contiguous 6-sample slice.
    s = MicroBatchSampler(30, 0, 2, 1, 2, global_batch_size=12)
    assert list(s) == [[6, 7], [8, 9], [10, 11], [18, 19], [20, 21], [22, 23]] and len(s) == 6


def test_exact_resume():
    mbs, dp, gbs = 2, 2, 8  # 2 accumulation steps
    full = [list(MicroBatchSampler(64, 0, mbs, r, dp, gbs)) for r in range(dp)]
    for consumed_batches in range(0, 8):
        resumed = [list(MicroBatchSampler(64, consumed_batches * gbs, mbs, r, dp, gbs)) for r in range(dp)]
        skip = consumed_batches * gbs // (mbs * dp)
        assert all(resumed[r] == full[r][skip:] for r in range(dp))


def test_global_batch_is_independent_of_dp():
    gbs = 12
    assert global_batch_indices(3, gbs) == list(range(36, 48))
    for mbs, dp in ((1, 1), (2, 3), (3, 2), (6, 2)):
        got = sorted(i for r in range(dp) for micro in rank_micro_batches(3, gbs, mbs, r, dp) for i in micro)
        assert got == global_batch_indices(3, gbs)


def test_contiguous_rank_slices():
    """Rank r takes the r-th contiguous G/dp slice of global batch N, cut into micro-batches."""
    assert rank_micro_batches(5, 12, 2, 1, 3) == [[64, 65], [66, 67]]
    assert rank_micro_batches(0, 8, 2, 0, 2) == [[0, 1], [2, 3]]


def test_errors():
    with pytest.raises(ValueError, match="multiple of global_batch_size"):
        MicroBatchSampler(100, 5, 2, 0, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        MicroBatchSampler(100, 0, 2, 2, 2)
    with pytest.raises(ValueError, match="divisible"):
        rank_micro_batches(0, 10, 4, 0, 1)


def test_works_as_dataloader_batch_sampler():
    import torch

    data = [np.arange(i, i + 5) for i in range(40)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=MicroBatchSampler(40, 8, 4, 1, 2),
                                         collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 4 and batches[0].dtype == torch.int64 and batches[0].shape == (4, 5)
    assert batches[0][:, 0].tolist() == [12, 13, 14, 15]
