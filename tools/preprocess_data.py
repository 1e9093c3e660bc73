#!/usr/bin/env python
"""Tokenize JSON-lines text into a Megatron-compatible indexed dataset (.bin/.idx).

Example:
    python tools/preprocess_data.py --input corpus.jsonl.gz --output-prefix data/corpus \\
        --tokenizer path/to/tokenizer.json --append-eod --workers 8

Output is byte-identical to Megatron-LM's tools/preprocess_data.py with the same tokenizer (an
empty document gets no sequence; --keep-empty writes one). SIGTERM (scancel) and Ctrl-C leave no
partial output. Thin wrapper over `megamoe.data.preprocess.main` (same as ``python -m megamoe
preprocess``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
