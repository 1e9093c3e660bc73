"""Top-level dataset construction for the trainer (and tools/print_batch.py).

    train_ds, valid_ds, tok = build_from_config(cfg, rank)        # TrainConfig in
    train_ds, valid_ds, tok = build_datasets(cfg.data, seq_length, train_samples,
                                             valid_samples, seed, rank, vocab_size=...)

Each path in data.paths is split into train/valid/test by contiguous document ranges
(data.split); with several paths the splits are blended by data.weights (default: in
proportion to each path's train tokens). No paths and data.default_corpus -> the bundled
stdlib corpus is built into data.cache_dir once and reused. Items are int64[seq_length + 1].
"""

from __future__ import annotations

import sys

import numpy as np

from megamoe.data.blending import BlendedDataset, blending_indices, megatron_dataset_sizes, samples_per_dataset
from megamoe.data.cache import barrier, dist_rank_world
from megamoe.data.corpus import build_default_corpus
from megamoe.data.gpt_dataset import SPLIT_NAMES, GPTDataset, split_document_ranges
from megamoe.data.indexed import IndexedDataset
from megamoe.data.tokenizer import tokenizer_info

DEFAULT_VOCAB_SIZE = 2048


def num_samples_for(cfg) -> tuple[int, int]:
    """(train_samples, valid_samples) for a TrainConfig, as `megamoe.training.run` computes them.

    train = steps * global_batch_size: it feeds the shuffle, so the trainer and print_batch
    must use the same number (they do). valid = max(1, eval_iters) * micro_batch_size * 64.
    """
    train = cfg.steps * cfg.global_batch_size
    valid = max(1, cfg.eval_iters) * cfg.micro_batch_size * 64
    return train, valid


def _default_corpus(data_cfg, vocab_size: int, log):
    """Build the stdlib corpus on rank 0 (others wait), then everyone opens it."""
    rank, world = dist_rank_world()
    if world > 1:
        if rank == 0:
            try:
                build_default_corpus(data_cfg.cache_dir, vocab_size, data_cfg.corpus_docs, log=log)
            except BaseException:
                barrier()
                raise
        barrier()
    return build_default_corpus(data_cfg.cache_dir, vocab_size, data_cfg.corpus_docs, log=log)


def _split_datasets(indexed: list[IndexedDataset], weights: list[float] | None, split: str, which: int,
                    seq_length: int, num_samples: int, seed: int, cache_dir: str | None, log,
                    order: str = "megamoe", vocab_size: int | None = None):
    """One split (0 train, 1 valid, 2 test) of all paths, blended; None if it has no tokens."""
    name = SPLIT_NAMES[which]
    docs, tokens = [], []
    for ds in indexed:
        start, end = split_document_ranges(len(ds), split)[which]
        docs.append(np.arange(start, end, dtype=np.int64))
        tokens.append(int(ds.sequence_lengths[start:end].sum(dtype=np.int64)))
    if weights is None:
        weights = [float(t) for t in tokens]  # like concatenating the corpora
    live = [k for k in range(len(indexed)) if tokens[k] > 0 and weights[k] > 0]
    if not live or num_samples <= 0:
        return None
    if len(indexed) == 1:
        return GPTDataset(indexed[0], docs[0], seq_length, num_samples, seed, cache_dir, name, log,
                          order=order, vocab_size=vocab_size)
    w = [weights[k] if k in live else 0.0 for k in range(len(indexed))]
    indices = blending_indices(w, num_samples, cache_dir, name, log, order)
    counts = samples_per_dataset(indices[0], len(indexed))
    if order == "megatron":  # Megatron builds each dataset with a 0.5% surplus: that sets its epochs
        counts = np.maximum(counts, megatron_dataset_sizes(w, num_samples))
    parts = [GPTDataset(indexed[k], docs[k], seq_length, int(counts[k]), seed, cache_dir, f"{name}{k}", log,
                        order=order, vocab_size=vocab_size)
             if counts[k] > 0 else None for k in range(len(indexed))]
    return BlendedDataset(parts, w, num_samples, name=name, indices=indices)


def build_datasets(data_cfg, seq_length: int, train_samples: int, valid_samples: int, seed: int,
                   rank: int = 0, vocab_size: int | None = None, log=None):
    """-> (train_ds, valid_ds or None, TokenizerInfo or None).

    data_cfg: megamoe.config.DataConfig. vocab_size: the model's vocabulary size, used to train
    the default corpus tokenizer (default 2048) and to check every dataset's token ids against
    (a ValueError naming the dataset and the id; the largest id is computed once and cached).
    rank: only rank 0 logs. With
    torch.distributed initialised, rank 0 builds missing caches while the others wait.
    valid_ds is None when the valid split has no documents or valid_samples is 0. The
    TokenizerInfo is None when data.paths are given without data.tokenizer.
    """
    if log is None:
        log = (lambda msg: print(f"[data] {msg}", file=sys.stderr)) if rank == 0 else (lambda msg: None)
    cache_dir = data_cfg.cache_dir or None
    if data_cfg.paths:
        prefixes = list(data_cfg.paths)
        tok_spec = data_cfg.tokenizer
    elif data_cfg.default_corpus:
        if not cache_dir:
            raise ValueError("data.cache_dir must be set to build the default corpus")
        corpus = _default_corpus(data_cfg, vocab_size or DEFAULT_VOCAB_SIZE, log)
        prefixes = [corpus.prefix]
        tok_spec = corpus.tokenizer_path  # the corpus is tokenized with its own tokenizer
    else:
        raise ValueError("no training data: set data.paths (indexed dataset prefixes) "
                         "or data.default_corpus: true")
    weights = list(data_cfg.weights) or None
    if weights is not None and len(weights) != len(prefixes):
        raise ValueError(f"data.weights has {len(weights)} entries but data.paths has {len(prefixes)}")
    indexed = [IndexedDataset(p) for p in prefixes]
    order = getattr(data_cfg, "sample_order", "megamoe")
    common = dict(order=order, vocab_size=vocab_size)
    train = _split_datasets(indexed, weights, data_cfg.split, 0, seq_length, train_samples, seed, cache_dir, log,
                            **common)
    if train is None:
        raise ValueError(f"the train split of {', '.join(prefixes)} has no tokens "
                         f"(data.split={data_cfg.split!r}, train_samples={train_samples})")
    valid = _split_datasets(indexed, weights, data_cfg.split, 1, seq_length, valid_samples, seed, cache_dir, log,
                            **common)
    if valid is None and valid_samples > 0:
        log(f"no validation data (data.split={data_cfg.split!r}); evaluation is skipped")
    info = tokenizer_info(tok_spec) if tok_spec else None
    if info is not None and vocab_size is not None and info.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {info.name!r} has {info.vocab_size} ids but model.vocab_size is "
                         f"{vocab_size}; raise model.vocab_size")
    return train, valid, info


def build_from_config(cfg, rank: int = 0, log=None):
    """build_datasets with everything taken from a megamoe.config.TrainConfig."""
    train_samples, valid_samples = num_samples_for(cfg)
    return build_datasets(cfg.data, cfg.model.seq_length, train_samples, valid_samples, cfg.seed,
                          rank=rank, vocab_size=cfg.model.vocab_size, log=log)


def collate(samples):
    """Stack int64[seq_length + 1] samples -> torch.LongTensor [B, seq_length + 1]."""
    import torch

    return torch.from_numpy(np.stack([np.asarray(s, dtype=np.int64) for s in samples]))
