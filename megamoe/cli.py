"""`python -m megamoe <command>`: train, preprocess, print-batch, convert, consolidate, upcycle,
analyze-routing, plan.

Each command is a thin front over a library function; user mistakes (bad config, missing
files) end with one line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, function taking argv, one-line help)
COMMANDS = {
    "train": ("megamoe.training.run", "main", "train a model from a YAML config (+ --section.key overrides)"),
    "preprocess": ("megamoe.data.preprocess", "main", "jsonl corpus -> Megatron .bin/.idx"),
    "print-batch": ("megamoe.data.print_batch", "main", "print the token ids of training batch N"),
    "convert": ("megamoe.hf.convert", "main", "convert checkpoints to / from Hugging Face format"),
    "consolidate": ("megamoe.checkpoint.consolidate", "main",
                    "merge a (sharded) checkpoint of any parallel layout into a single-process one"),
    "upcycle": ("megamoe.hf.upcycle", "main", "dense checkpoint -> MoE (sparse upcycling / splitting)"),
    "analyze-routing": ("megamoe.analysis.routing", "main", "plots of expert load and co-activation"),
    "plan": ("megamoe.plan.cli", "main", "memory, step time and communication of parallel layouts on a cluster"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="megamoe", description="Mixture-of-Experts LM training")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(
        f"{k}: {v[2]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    module_name, fn_name, _ = COMMANDS[args.command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("megamoe"):
            print(f"megamoe: command {args.command!r} is not available in this build ({err.name})",
                  file=sys.stderr)
            return 2
        raise
    try:
        return int(getattr(module, fn_name)(argv[1:]) or 0)
    except ValueError as err:  # user mistakes are ValueErrors with a one-line message
        print(f"megamoe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
