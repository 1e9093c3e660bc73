"""`python -m megamoe plan`: which layouts fit a cluster, and how fast each would train.

    python -m megamoe plan --preset olmoe-1b-7b --gpus 8                 # ranked table
    python -m megamoe plan --preset mixtral-8x7b --gpus 64 --json        # every layout, JSON
    python -m megamoe plan --preset mixtral-8x7b --gpus 64 --parallel.pp 4 --parallel.ep 8   # one layout
    python -m megamoe plan --calibrate --calibration-out cal.json        # measure on this machine
    python -m megamoe plan --preset olmoe-1b-7b --gpus 8 --calibration cal.json

The model and batch come from the same preset / YAML / dotted overrides as `train`. Any
`--parallel.*` override fixes the layout (only that one is evaluated); `--micro_batch_size` and
`--recompute` / `--activation_checkpointing` restrict the enumeration to that value.
"""

from __future__ import annotations

import argparse
import json
import sys

from megamoe.config import load, parse_overrides
from megamoe.plan.constants import GPUS, constants_for, load_calibration
from megamoe.plan.report import Cluster, describe_one, plan, table, to_json


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog="megamoe plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config file (as for train)")
    ap.add_argument("--preset", help="preset (tiny, olmoe-1b-7b, mixtral-8x7b, deepseek-moe-16b, olmo-1b)")
    ap.add_argument("--gpus", type=int, help="GPUs in the job")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="peak FLOP/s, memory, bandwidths")
    ap.add_argument("--gpu-memory-gib", type=float, help="memory per GPU (default: the --gpu's)")
    ap.add_argument("--peak-tflops", type=float, help="override: dense bf16 TFLOP/s per GPU")
    ap.add_argument("--intra-node-gbps", type=float, help="override: NVLink GB/s per GPU per direction")
    ap.add_argument("--inter-node-gbps", type=float, help="override: network GB/s per GPU per direction")
    ap.add_argument("--calibration", help="JSON of constants written by --calibrate")
    ap.add_argument("--calibrate", action="store_true", help="measure GEMM efficiency (and all-to-all "
                    "bandwidth under torchrun with several GPUs) here, print the JSON and exit")
    ap.add_argument("--calibration-out", help="with --calibrate: write the JSON here")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ap.add_argument("--top", type=int, default=20, help="rows of the table (JSON: all layouts)")
    args, overrides = ap.parse_known_args(argv)
    return args, overrides


def build(args, overrides):
    if args.config is None and args.preset is None:
        args.preset = "tiny"
    cfg = load(args.config, overrides, args.preset)
    keys = [k for k, _ in parse_overrides(overrides)]
    fixed = any(k.startswith("parallel.") for k in keys)
    c = constants_for(args.gpu)
    if args.calibration:
        c = load_calibration(c, args.calibration)
    c = c.with_overrides(peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None,
                         intra_node_bytes_per_s=args.intra_node_gbps * 1e9 if args.intra_node_gbps else None,
                         inter_node_bytes_per_s=args.inter_node_gbps * 1e9 if args.inter_node_gbps else None)
    if args.gpus is None or args.gpus < 1:
        raise ValueError("--gpus N (the number of GPUs of the job, >= 1) is required")
    cluster = Cluster(args.gpus, args.gpus_per_node, args.gpu_memory_gib or c.hardware.memory_gib)
    mbs = (cfg.micro_batch_size,) if "micro_batch_size" in keys else (1, 2, 4)
    rc = None
    if "recompute" in keys or "activation_checkpointing" in keys:
        rc = (cfg.recompute if cfg.activation_checkpointing else "none",)
    return cfg, cluster, c, fixed, mbs, rc


def main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    if args.calibrate:
        from megamoe.plan.calibrate import calibrate
        result = calibrate(args.gpu)
        text = json.dumps(result, indent=1)
        if args.calibration_out:
            with open(args.calibration_out, "w") as f:
                f.write(text + "\n")
        print(text)
        return 0
    cfg, cluster, c, fixed, mbs, rc = build(args, overrides)
    plans = plan(cfg, cluster, c, fixed=fixed, micro_batch_sizes=mbs, recompute=rc)
    if args.json:
        print(to_json(cfg, plans, cluster, c))
    else:
        print(table(cfg, plans, cluster, c, args.top))
        if fixed or len(plans) == 1 or plans[0].fits:
            print("best: " + describe_one(plans[0]) if not fixed else describe_one(plans[0]))
    return 0


def dry_run(cfg, world: int, gpu: str = "h100") -> int:
    """`megamoe train --dry-run`: the plan of the configured layout on `world` GPUs, then exit."""
    c = constants_for(gpu)
    cluster = Cluster(world, min(world, 8), c.hardware.memory_gib)
    p = plan(cfg, cluster, c, fixed=True)[0]
    print(f"megamoe: dry run, {world} x {gpu} (planned; nothing is trained)")
    print("megamoe: plan: " + describe_one(p))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
