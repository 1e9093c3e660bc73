#!/usr/bin/env python
"""Append the tokens of a new tokenizer to a model's vocabulary.

Example:
    python tools/extend_vocab.py runs/olmoe runs/olmoe-ext --old-tokenizer tok/old.json \\
        --new-tokenizer tok/new.json --pad-to 64

New embedding / lm_head rows start as the mean of the old rows; old rows stay exact.
Thin wrapper over `megamoe.hf.vocab.main`; errors end with one line on stderr and exit code 2.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.hf.vocab import main  # noqa: E402


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except ValueError as err:  # user mistakes: one line, like `python -m megamoe`
        print(f"extend_vocab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
