#!/usr/bin/env python
"""Merge a checkpoint of any parallel layout (sharded model_rank/optim_rank files) into a
single-process checkpoint directory that the single-process Trainer resumes, or a .pt file
holding the full weights.

Examples:
    python tools/consolidate_checkpoint.py runs/olmoe/checkpoints/step_00001000 runs/olmoe-single
    python tools/consolidate_checkpoint.py runs/olmoe weights.pt      # newest complete checkpoint, weights only

Thin wrapper over `megamoe.checkpoint.consolidate.main` (same as ``python -m megamoe consolidate``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["consolidate", *sys.argv[1:]]))
