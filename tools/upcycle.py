#!/usr/bin/env python
"""Turn a dense checkpoint (megamoe, or an HF llama / olmo2 directory) into an MoE one.

Examples:
    python tools/upcycle.py runs/olmo-1b runs/olmo-1b-8x --num-experts 8 --top-k 2
    python tools/upcycle.py hf/llama runs/llama-moe --num-experts 8 --top-k 2 --mode split \\
        --split-method kmeans

Thin wrapper over `megamoe.hf.upcycle.main` (same as ``python -m megamoe upcycle``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["upcycle", *sys.argv[1:]]))
