"""Benchmark one MoE layer (fwd + bwd) against an equal-FLOP dense SwiGLU MLP, in one run.

Prints TFLOP/s per variant and its ratio to the dense MLP:
  megamoe[grouped_mm]  megamoe MoELayer with torch._grouped_mm
  megamoe[loop]        megamoe MoELayer with the per-expert loop
  dense_mlp            SwiGLU with hidden = top_k * expert_hidden (same FLOPs as the MoE experts)
  hf[grouped_mm|eager] transformers' OLMoE / Mixtral sparse MoE block (if transformers is installed
                       and offers the experts implementation)
FLOPs counted: 3 (fwd + bwd) * tokens * top_k * 6 * d * I, router excluded (see DESIGN.md).

Examples:
  python benchmarks/moe_layer.py                         # small CPU shape, fp32
  python benchmarks/moe_layer.py --shape olmoe --dtype bf16 --hf   # on a GPU
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from megamoe.config import MoEConfig
from megamoe.model.mlp import SwiGLU
from megamoe.moe.layer import MoELayer

SHAPES = {  # d_model, expert_hidden, experts, top_k, tokens, router mode
    "tiny": (256, 512, 8, 2, 2048, "softmax_topk"),
    "olmoe": (2048, 1024, 64, 8, 16384, "softmax_topk"),
    "mixtral": (4096, 14336, 8, 2, 8192, "topk_softmax"),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, warmup: int, iters: int, autocast_dtype) -> float:
    """Median seconds of one forward + backward."""
    grad = torch.randn_like(x)
    times = []
    for i in range(warmup + iters):
        xi = x.detach().requires_grad_(True)
        sync(x.device)
        t0 = time.perf_counter()
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = module(xi)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad.to(out.dtype))
        sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        module.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def hf_block(shape: str, d: int, hidden: int, experts: int, top_k: int, impl: str):
    """transformers' sparse MoE block for the shape's architecture, or None if unavailable."""
    try:
        if shape == "mixtral":
            from transformers.models.mixtral.configuration_mixtral import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
            cfg = MixtralConfig(hidden_size=d, intermediate_size=hidden, num_local_experts=experts,
                                num_experts_per_tok=top_k)
        else:
            from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
            from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
            cfg = OlmoeConfig(hidden_size=d, intermediate_size=hidden, num_experts=experts,
                              num_experts_per_tok=top_k)
        cfg._experts_implementation = impl
        if hasattr(cfg, "experts_implementation"):
            cfg.experts_implementation = impl
        block = Block(cfg)
    except Exception as err:  # noqa: BLE001 - optional comparison only
        print(f"  (transformers {impl} block unavailable: {type(err).__name__}: {err})")
        return None
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    return block


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--tokens", type=int, default=0, help="override the shape's token count")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="bf16 autocast (default on GPU) or fp32 (default on CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--hf", action="store_true", help="also time transformers' MoE blocks")
    args = ap.parse_args(argv)

    d, hidden, experts, top_k, tokens, mode = SHAPES[args.shape]
    tokens = args.tokens or tokens
    device = torch.device(args.device)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
    torch.manual_seed(0)
    x = torch.randn(tokens, d, device=device)
    flops = 3 * tokens * top_k * 6 * d * hidden
    print(f"shape {args.shape}: d {d}, expert hidden {hidden}, {experts} experts top-{top_k}, "
          f"{tokens} tokens, {dtype}, {device}; {flops / 1e12:.3f} TFLOP per fwd+bwd")

    variants: dict[str, nn.Module] = {}
    dense = SwiGLU(d, top_k * hidden).to(device)
    variants["dense_mlp"] = dense
    for backend in ("grouped_mm", "loop"):
        cfg = MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=hidden, router_mode=mode,
                        gemm_backend=backend)
        layer = MoELayer(d, cfg).to(device)
        for p in layer.parameters():
            nn.init.normal_(p, std=0.02)
        variants[f"megamoe[{backend}]"] = layer
    if args.hf:
        for impl in ("grouped_mm", "eager"):
            block = hf_block(args.shape, d, hidden, experts, top_k, impl)
            if block is not None:
                variants[f"hf[{impl}]"] = block.to(device)

    results = {}
    for name, module in variants.items():
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            inp = x.unsqueeze(0) if name.startswith("hf") else x
            seconds = time_fwd_bwd(module, inp, args.warmup, args.iters, autocast_dtype)
        except Exception as err:  # noqa: BLE001 - report and go on with the others
            print(f"{name:22s} failed: {type(err).__name__}: {err}")
            continue
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        results[name] = (seconds, flops / seconds / 1e12, mem)
        module.cpu()
    base = results.get("dense_mlp", (None, None))[1]
    print(f"{'variant':22s} {'ms':>9s} {'TFLOP/s':>9s} {'vs dense':>9s} {'peak GiB':>9s}")
    for name, (seconds, tflops, mem) in results.items():
        ratio = tflops / base if base else float("nan")
        print(f"{name:22s} {seconds * 1e3:9.2f} {tflops:9.3f} {ratio:9.3f} {mem:9.2f}")


if __name__ == "__main__":
    main()
