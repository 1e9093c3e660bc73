#!/usr/bin/env python
"""Routing plots of a MoE checkpoint: expert load, co-activation, per-domain specialisation, loss.

Same as `python -m megamoe analyze-routing ...`; see megamoe/analysis/routing.py for details.
    python tools/analyze_routing.py runs/tiny --tokens-npy a.npy b.npy --out routing/
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.cli import main  # noqa: E402  (after the path tweak: runs from a checkout)

if __name__ == "__main__":
    sys.exit(main(["analyze-routing", *sys.argv[1:]]))
