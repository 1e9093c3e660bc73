#!/usr/bin/env python
"""Convert checkpoints between megamoe and Hugging Face formats.

Examples:
    python tools/convert_checkpoint.py to-hf runs/olmoe hf/olmoe --model-type olmoe --tokenizer tok/
    python tools/convert_checkpoint.py from-hf hf/mixtral runs/mixtral-ct --seq-length 4096

Thin wrapper over `megamoe.hf.convert.main` (same as ``python -m megamoe convert``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
