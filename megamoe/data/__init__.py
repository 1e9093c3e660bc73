"""Data pipeline: indexed datasets, tokenizers, GPT samples, blending, deterministic sampling.

Trainer entry points:
    build_from_config(cfg, rank) -> (train_ds, valid_ds | None, TokenizerInfo | None)
    MicroBatchSampler(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size,
                      global_batch_size=None)
    global_batch_indices(batch_number, global_batch_size)
"""

from megamoe.data.blending import BlendedDataset
from megamoe.data.builder import build_datasets, build_from_config, collate, num_samples_for
from megamoe.data.gpt_dataset import GPTDataset, parse_split, split_document_ranges
from megamoe.data.indexed import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, best_dtype,
                                  merge_datasets)
from megamoe.data.sampler import MicroBatchSampler, global_batch_indices, rank_micro_batches
from megamoe.data.tokenizer import TokenizerInfo, load_tokenizer

__all__ = [
    "BlendedDataset", "GPTDataset", "IndexedDataset", "IndexedDatasetBuilder", "IndexedDatasetError",
    "MicroBatchSampler", "TokenizerInfo", "best_dtype", "build_datasets", "build_from_config", "collate",
    "global_batch_indices", "load_tokenizer", "merge_datasets", "num_samples_for", "parse_split",
    "rank_micro_batches", "split_document_ranges",
]
