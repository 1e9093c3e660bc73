"""Deterministic data-parallel sampling that resumes at the exact sample position.

Sample indices are consumed in order 0, 1, 2, ... (the datasets are already shuffled).
Global batch N is exactly samples ``[N * G, (N + 1) * G)`` (G = global_batch_size =
micro_batch_size * dp_size * accumulation_steps), whatever the number of ranks. Inside it,
data-parallel rank r takes the contiguous slice ``[N*G + r*G/dp, N*G + (r+1)*G/dp)`` and cuts
it into micro-batches of micro_batch_size, in order (the trainer's
the trainer reads its micro-batches through `rank_micro_batches`). A restart with
``consumed_samples = N * G`` therefore continues with batch N.
"""

from __future__ import annotations


class MicroBatchSampler:
    """Yield this rank's micro-batches (lists of sample indices) from consumed_samples on.

    global_batch_size defaults to micro_batch_size * dp_size (no gradient accumulation).
    Works as a ``batch_sampler`` for torch.utils.data.DataLoader. A trailing incomplete
    global batch is dropped.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, global_batch_size: int | None = None):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 (got {micro_batch_size})")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size) (got rank {dp_rank}, size {dp_size})")
        if total_samples < 0 or consumed_samples < 0:
            raise ValueError("total_samples and consumed_samples must be >= 0")
        gbs = global_batch_size or micro_batch_size * dp_size
        if gbs % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size ({gbs}) must be divisible by "
                             f"micro_batch_size * dp_size ({micro_batch_size * dp_size})")
        if consumed_samples % gbs:
            raise ValueError(f"consumed_samples ({consumed_samples}) must be a multiple of "
                             f"global_batch_size ({gbs})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.global_batch_size = gbs

    @property
    def per_rank(self) -> int:
        """Samples this rank takes from every global batch."""
        return self.global_batch_size // self.dp_size

    def __len__(self) -> int:
        """Micro-batches this rank will still yield."""
        batches = max(0, self.total_samples - self.consumed_samples) // self.global_batch_size
        return batches * (self.per_rank // self.micro_batch_size)

    def __iter__(self):
        last_batch = self.total_samples - self.global_batch_size  # last start of a complete batch
        for batch_start in range(self.consumed_samples, last_batch + 1, self.global_batch_size):
            first = batch_start + self.dp_rank * self.per_rank
            for m in range(first, first + self.per_rank, self.micro_batch_size):
                yield list(range(m, m + self.micro_batch_size))


def global_batch_indices(batch_number: int, global_batch_size: int) -> list[int]:
    """Sample indices of global batch N (0-based), across all ranks and micro-batches, in order."""
    if batch_number < 0 or global_batch_size < 1:
        raise ValueError(f"need batch_number >= 0 and global_batch_size >= 1 "
                         f"(got {batch_number}, {global_batch_size})")
    start = batch_number * global_batch_size
    return list(range(start, start + global_batch_size))


def rank_micro_batches(batch_number: int, global_batch_size: int, micro_batch_size: int,
                       dp_rank: int, dp_size: int) -> list[list[int]]:
    """The micro-batches rank dp_rank gets for global batch N (what MicroBatchSampler yields)."""
    sampler = MicroBatchSampler((batch_number + 1) * global_batch_size, batch_number * global_batch_size,
                                micro_batch_size, dp_rank, dp_size, global_batch_size)
    return list(sampler)
