"""Print the exact token ids of training global batch N, as the trainer sees them.

    python -m megamoe print-batch --config cfg.yaml --batch 3 [--dp 2] [--decode] [--model.seq_length 256]
    python tools/print_batch.py ...   (same)

The train dataset is built exactly as the trainer builds it (`build_datasets` with
train_samples = steps * global_batch_size, seed, seq_length and vocab size from the config;
no validation set is needed here), and global batch N is split over data-parallel ranks and
micro-batches with `rank_micro_batches`, the trainer's layout. One line per sample:
``batch N rank R micro M row B sample S: <ids>``.
"""

from __future__ import annotations

import argparse
import sys

from megamoe.data.builder import build_datasets, num_samples_for
from megamoe.data.sampler import rank_micro_batches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="print_batch", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML config (optional)")
    p.add_argument("--preset", default=None, help="preset name (e.g. tiny)")
    p.add_argument("--batch", type=int, required=True, help="global batch number N (0-based)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size to show the per-rank split for")
    p.add_argument("--decode", action="store_true", help="also print the decoded text of each sample")
    return p


def format_batch(train_ds, batch: int, global_batch_size: int, micro_batch_size: int, dp: int,
                 decode=None) -> list[str]:
    """The printed lines for global batch `batch`."""
    lines = []
    for rank in range(dp):
        for m, micro in enumerate(rank_micro_batches(batch, global_batch_size, micro_batch_size, rank, dp)):
            for row, s in enumerate(micro):
                ids = train_ds[s % len(train_ds)].tolist()  # the trainer wraps around the same way
                lines.append(f"batch {batch} rank {rank} micro {m} row {row} sample {s}: "
                             f"{' '.join(map(str, ids))}")
                if decode is not None:
                    lines.append(f"  text: {decode(ids)!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 ok, 2 user error (one line on stderr)."""
    from megamoe import config as config_lib

    args, overrides = build_parser().parse_known_args(argv)
    try:
        cfg = config_lib.load(args.config, overrides, preset_name=args.preset)
        if not 0 <= args.batch < cfg.steps:
            raise ValueError(f"--batch must be in [0, steps={cfg.steps})")
        if args.dp < 1:
            raise ValueError(f"--dp must be >= 1 (got {args.dp})")
        train_samples, _ = num_samples_for(cfg)
        train, _, tok = build_datasets(cfg.data, cfg.model.seq_length, train_samples, 0, cfg.seed,
                                       vocab_size=cfg.model.vocab_size)
        decode = tok.decode if (args.decode and tok is not None) else None
        for line in format_batch(train, args.batch, cfg.global_batch_size, cfg.micro_batch_size, args.dp, decode):
            print(line)
    except ValueError as err:
        print(f"print_batch: error: {err}", file=sys.stderr)
        return 2
    return 0
