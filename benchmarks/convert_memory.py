"""Peak memory of checkpoint conversion, both ways, on a synthetic multi-shard checkpoint.

  python benchmarks/convert_memory.py [--size-gb 1.2] [--shards 4] [--workdir DIR]

Builds an HF directory of a Mixtral-like model (bf16 random weights, --shards safetensors
files, written shard by shard: the generator holds one shard), then runs, each in its own
subprocess, `convert from-hf` (output files of the same size budget as the input's) and
`convert to-hf` of the result, and reads each child's peak RSS (VmHWM, /proc/self/status) at
its exit. Prints one line per conversion and ends with

  peak_rss_over_largest_shards X

X = max over both conversions of peak RSS / (largest input file + largest output file): the
streaming converters hold about one output shard plus one layer, whatever the model size (the
python + torch import baseline, printed separately, is included in the peak).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(argv: list[str]) -> None:
    """Run one conversion (or only the imports, argv == []) and print the peak RSS."""
    from megamoe.hf.convert import main

    if argv:
        main(argv)
    print(f"VMHWM_KIB {_peak_kib()}")


def model_config(size_gb: float):
    """A Mixtral-like megamoe config of about `size_gb` GB in bf16."""
    from megamoe.config import ModelConfig, MoEConfig

    if size_gb < 0.2:                     # the smoke-test size
        d, inter, vocab = 64, 128, 512
    else:
        d, inter, vocab = 1024, 2816, 32000
    per_layer = 2 * (8 * 3 * d * inter + 2 * d * d + 2 * d * d // 4)
    layers = max(2, round((size_gb * 1e9 - 2 * 2 * vocab * d) / per_layer))
    return ModelConfig(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=8, num_kv_heads=2,
                       ffn_hidden=inter, seq_length=512, init_std=0.02,
                       moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=inter,
                                     router_mode="topk_softmax"))


def make_hf_dir(path: str, size_gb: float, shards: int, seed: int = 0) -> int:
    """Write the synthetic HF directory; returns the shard budget in bytes."""
    import torch

    from megamoe.hf.convert import tensor_to_hf
    from megamoe.hf.io import expected_state, save_safetensors
    from megamoe.hf.layouts import config_to_hf, get_layout

    cfg = model_config(size_gb)
    shapes = expected_state(cfg)
    total = sum(2 * torch.Size(s).numel() for n, s in shapes.items() if not n.endswith("expert_bias"))
    budget = -(-total // shards)
    gen = torch.Generator().manual_seed(seed)
    layout = get_layout("mixtral")

    def tensors():
        for name, shape in shapes.items():
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            yield from tensor_to_hf(cfg, layout, name, t)

    os.makedirs(path)
    save_safetensors(tensors(), path, budget)
    hf_cfg = config_to_hf(cfg, "mixtral")
    hf_cfg["dtype"] = "bfloat16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    return budget


def _largest(d: str) -> int:
    out = 0
    for root, _, names in os.walk(d):
        out = max([out] + [os.path.getsize(os.path.join(root, n)) for n in names
                           if n.endswith((".safetensors", ".pt", ".bin"))])
    return out


def run_child(argv: list[str]) -> tuple[int, float]:
    """(peak RSS bytes, seconds) of one conversion in a fresh process."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv],
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"conversion {argv} failed:\n{out.stdout}\n{out.stderr}")
    kib = int(out.stdout.split("VMHWM_KIB")[-1].split()[0])
    return kib * 1024, time.perf_counter() - start


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-gb", type=float, default=1.2, help="checkpoint size in bf16 (>= 1 for the record)")
    p.add_argument("--shards", type=int, default=4, help="input safetensors files")
    p.add_argument("--workdir", help="where to write (default: a temporary directory, removed)")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="convert_memory-")
    try:
        hf, mm, back = (os.path.join(work, n) for n in ("hf", "mm", "back"))
        budget = make_hf_dir(hf, args.size_gb, args.shards)
        size = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf))
        base, _ = run_child([])
        print(f"checkpoint {size / 1e9:.3f} GB in {args.shards} shards; python + torch + megamoe "
              f"import baseline {base / 2**20:.0f} MiB")
        worst = 0.0
        for label, argv, src, dst in (
                ("from-hf", ["from-hf", hf, mm, "--max-shard-size", str(budget)], hf, mm),
                ("to-hf", ["to-hf", mm, back, "--max-shard-size", str(budget)], mm, back)):
            peak, secs = run_child(argv)
            denom = _largest(src) + _largest(dst)
            ratio = peak / denom
            worst = max(worst, ratio)
            print(f"{label}: peak RSS {peak / 2**20:.0f} MiB, largest input + output file "
                  f"{denom / 2**20:.0f} MiB, ratio {ratio:.2f}, {secs:.1f} s")
        print(f"peak_rss_over_largest_shards {worst:.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
