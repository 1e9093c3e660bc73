#!/usr/bin/env python
"""Print the exact token ids of training global batch N, as the trainer sees them.

    python tools/print_batch.py --config examples/configs/tiny.yaml --batch 3 [--dp 2] [--decode] \\
        [--model.seq_length 256 ...]

Thin wrapper over `megamoe.data.print_batch.main` (same as ``python -m megamoe print-batch``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data.print_batch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
