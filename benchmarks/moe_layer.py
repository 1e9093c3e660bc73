#!/usr/bin/env python
"""Benchmark one MoE layer (fwd + bwd) against an equal-FLOP dense SwiGLU MLP, in one run.

Variants (all timed in the same process, on the same input and the same weights):
  dense_mlp            SwiGLU with hidden = top_k * expert_hidden (the MoE's active FLOPs): the
                       baseline every ratio is taken against
  megamoe[grouped_mm]  megamoe MoELayer, experts through torch._grouped_mm (when supported)
  megamoe[loop]        megamoe MoELayer, one matmul per expert
  megamoe[grouped_gemm]  megablocks' grouped_gemm (CUDA, only when the package is installed)
  hf[grouped_mm]       transformers' OlmoeSparseMoeBlock (olmoe, tiny) / MixtralSparseMoeBlock
  hf[eager]            (mixtral), random-init from a config, with the experts implementation set
                       through config._experts_implementation ("grouped_mm" or "eager"; see
                       transformers/integrations/moe.py, ExpertsInterface / use_experts_implementation)
The HF blocks get megamoe's weights (router [E, H]; gate_up_proj [E, 2I, H] = w_gate_up^T;
down_proj [E, H, I] = w_down^T), so every variant routes the same tokens to the same experts.

FLOPs counted (DESIGN.md): 3 (fwd + bwd) x tokens x top_k x 6 x d x I, active experts only,
router excluded. TFLOP/s = FLOPs / median time; "vs dense" = TFLOP/s / dense TFLOP/s.
Memory: "weights GiB" = the variant's parameters; "fwd+bwd peak GiB" = torch.cuda.max_memory_allocated
during its fwd + bwd minus what was allocated just before (activations, weight gradients and
temporaries on top of the resident weights and input); "n/a" on CPU (no allocator statistics).
Variants are timed round-robin (one fwd + bwd of each per round), so load from other processes on
a shared machine hits all of them alike.

Precision: fp32 on CPU. On GPU bf16 by default, as *bf16 parameters and activations* (no
autocast): transformers' grouped_mm path is not autocast-aware (it casts the input to the weight
dtype), so fp32 master weights + autocast would run its expert GEMMs in fp32. --amp times every
variant with fp32 parameters under bf16 autocast instead (how megamoe's trainer runs).
Timing: CUDA events around fwd + bwd after a synchronize (GPU), perf_counter (CPU); median.
megamoe layers run in train mode (their load-balancing / z-loss bookkeeping included).

--check: before timing, verify in fp32 that megamoe's layer computes the transformers block's
output (and input gradient, and expert-weight gradients) for the same weights; exits 1 on a mismatch.

Examples:
  python benchmarks/moe_layer.py                              # tiny shape, CPU, fp32 (< 1 min)
  python benchmarks/moe_layer.py --shape tiny --tokens 512 --iters 3 --check
  python benchmarks/moe_layer.py --shape olmoe --check        # on a GPU (bf16)
  python benchmarks/moe_layer.py --shape mixtral --check      # on a GPU (bf16)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from megamoe.config import MoEConfig  # noqa: E402
from megamoe.model.mlp import SwiGLU  # noqa: E402
from megamoe.moe.experts import grouped_mm_supported  # noqa: E402
from megamoe.moe.layer import MoELayer  # noqa: E402
from megamoe import ops  # noqa: E402
from megamoe.ops import optional  # noqa: E402

SHAPES = {  # d_model, expert_hidden, experts, top_k, tokens, router mode, HF family
    "tiny": (256, 512, 8, 2, 2048, "softmax_topk", "olmoe"),
    "olmoe": (2048, 1024, 64, 8, 16384, "softmax_topk", "olmoe"),
    "mixtral": (4096, 14336, 8, 2, 8192, "topk_softmax", "mixtral"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_flops(tokens: int, top_k: int, d: int, hidden: int) -> int:
    return 3 * tokens * top_k * 6 * d * hidden


# ------------------------------------------------------------------------------------ builders

def megamoe_layer(d, hidden, experts, top_k, mode, backend) -> MoELayer:
    cfg = MoEConfig(num_experts=experts, top_k=top_k, expert_hidden=hidden, router_mode=mode,
                    gemm_backend=backend)
    return MoELayer(d, cfg)


def hf_block(family: str, d: int, hidden: int, experts: int, top_k: int, impl: str) -> nn.Module:
    """transformers' sparse MoE block with the experts implementation `impl` (random init)."""
    if family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        cfg = MixtralConfig(hidden_size=d, intermediate_size=hidden, num_local_experts=experts,
                            num_experts_per_tok=top_k, router_jitter_noise=0.0,
                            experts_implementation=impl)
    else:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
        cfg = OlmoeConfig(hidden_size=d, intermediate_size=hidden, num_experts=experts,
                          num_experts_per_tok=top_k, norm_topk_prob=False, experts_implementation=impl)
    cfg._experts_implementation = impl   # what use_experts_implementation's forward dispatches on
    return Block(cfg)


@torch.no_grad()
def copy_megamoe_to_hf(layer: MoELayer, block: nn.Module) -> None:
    """megamoe w_gate_up [E, H, 2I] (gate | up), w_down [E, I, H] -> HF [E, 2I, H], [E, H, I]."""
    block.gate.weight.copy_(layer.router.weight)
    block.experts.gate_up_proj.copy_(layer.experts.w_gate_up.transpose(1, 2))
    block.experts.down_proj.copy_(layer.experts.w_down.transpose(1, 2))


# -------------------------------------------------------------------------------------- timing

def fwd_bwd_once(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, amp: bool,
                 device: torch.device) -> tuple[float, float | None]:
    """(seconds, extra GiB) of one forward + backward. extra = peak allocated during it minus what
    was allocated before it (activations, weight gradients, temporaries); None on CPU."""
    xi = x.detach().requires_grad_(True)
    sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        out = module(xi)
    out.backward(grad.to(out.dtype))
    if device.type == "cuda":
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        extra = (torch.cuda.max_memory_allocated(device) - before) / 2**30
    else:
        seconds, extra = time.perf_counter() - t0, None
    module.zero_grad(set_to_none=True)
    return seconds, extra


def param_gib(module: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


# --------------------------------------------------------------------------------------- check

def check_against_hf(family, d, hidden, experts, top_k, mode, tokens, device, seed=0) -> bool:
    """fp32: megamoe MoELayer == transformers block (both experts implementations), same weights."""
    torch.manual_seed(seed)
    layer = megamoe_layer(d, hidden, experts, top_k, mode, "auto")
    for p in layer.parameters():
        nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, d)
    g = torch.randn(tokens, d)
    blocks = {}
    for impl in ("grouped_mm", "eager"):
        blocks[impl] = hf_block(family, d, hidden, experts, top_k, impl)
        copy_megamoe_to_hf(layer, blocks[impl])
    layer = layer.to(device).eval()   # eval: no aux-loss gradient, compare the data path only
    xm = x.to(device, copy=True).requires_grad_(True)
    ym = layer(xm)
    ym.backward(g.to(device))
    ref = (ym.detach(), xm.grad, layer.experts.w_gate_up.grad.transpose(1, 2),
           layer.experts.w_down.grad.transpose(1, 2))
    # CPU fp32 agrees to ~1e-6; CUDA fp32 GEMM kernels may use TF32 internally, hence the looser bound.
    tol = 1e-4 if device.type == "cpu" else 5e-3
    ok = True
    for impl in ("grouped_mm", "eager"):
        try:
            block = blocks.pop(impl).to(device).eval()
            xh = x.to(device, copy=True).unsqueeze(0).requires_grad_(True)
            yh = block(xh)
            yh.backward(g.to(device).unsqueeze(0))
        except Exception as err:  # noqa: BLE001 - a block that cannot run is a failed check
            print(f"check megamoe == hf[{impl}]: the transformers block failed: {type(err).__name__}: {err}")
            ok = False
            continue
        got = (yh.detach()[0], xh.grad[0], block.experts.gate_up_proj.grad, block.experts.down_proj.grad)
        parts, impl_ok = [], True
        for name, a, b in zip(("out", "d_x", "d_gate_up", "d_down"), ref, got):
            err = (a - b).abs().max().item() / max(a.abs().max().item(), 1e-30)
            parts.append(f"{name} {err:.1e}")
            impl_ok &= err < tol
        print(f"check megamoe == hf[{impl}] (fp32, {tokens} tokens, max |diff| / max |ref|, tol {tol:g}): "
              f"{', '.join(parts)} -> {'OK' if impl_ok else 'MISMATCH'}")
        ok &= impl_ok
        del block, xh, yh, got
    return ok


# ---------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--tokens", type=int, default=0, help="override the shape's token count")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="bf16 (default on GPU) or fp32 (default on CPU)")
    ap.add_argument("--amp", action="store_true",
                    help="with bf16: fp32 parameters under bf16 autocast instead of bf16 parameters")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 3 GPU, 1 CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 GPU, 3 CPU)")
    ap.add_argument("--check", action="store_true", help="verify megamoe == transformers block first")
    ap.add_argument("--check-tokens", type=int, default=0, help="tokens for --check (default: --tokens)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers blocks")
    ap.add_argument("--hf", action="store_true", help=argparse.SUPPRESS)  # old flag: now the default
    args = ap.parse_args(argv)

    d, hidden, experts, top_k, tokens, mode, family = SHAPES[args.shape]
    tokens = args.tokens or tokens
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    args.iters = args.iters if args.iters is not None else (10 if on_gpu else 3)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    amp = dtype == "bf16" and args.amp
    param_dtype = torch.bfloat16 if dtype == "bf16" and not amp else torch.float32
    flops = layer_flops(tokens, top_k, d, hidden)
    precision = "bf16 autocast, fp32 params" if amp else ("bf16 params" if dtype == "bf16" else "fp32")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"shape {args.shape}: d {d}, expert hidden {hidden}, {experts} experts top-{top_k}, {tokens} tokens, "
          f"{precision}, {dev_name}; {flops / 1e12:.4f} TFLOP per fwd+bwd (active experts, router excluded); "
          f"median of {args.iters} after {args.warmup} warmup; megamoe permute ops: {ops.backend(device)}")

    ok = True
    if args.check and not args.no_hf:
        ok = check_against_hf(family, d, hidden, experts, top_k, mode, args.check_tokens or tokens, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # One set of weights (fp32, CPU) shared by every MoE variant.
    torch.manual_seed(0)
    proto = megamoe_layer(d, hidden, experts, top_k, mode, "auto")
    for p in proto.parameters():
        nn.init.normal_(p, std=0.02)
    dense = SwiGLU(d, top_k * hidden)
    for p in dense.parameters():
        nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, d)

    builders: dict[str, callable] = {"dense_mlp": lambda: dense}
    gemm_dtype = torch.bfloat16 if amp else param_dtype
    probe_x = torch.empty(1, d, dtype=gemm_dtype, device=device)
    probe_w = torch.empty(1, hidden, d, dtype=gemm_dtype, device=device)   # like w_down [E, I, H]
    backends = []
    if grouped_mm_supported(probe_x, probe_w):
        backends.append("grouped_mm")
    else:
        print("  (megamoe[grouped_mm] skipped: torch._grouped_mm does not support this device / dtype)")
    backends.append("loop")
    if device.type == "cuda" and optional.available()["grouped_gemm"]:
        backends.append("grouped_gemm")
    for backend in backends:
        def build(backend=backend):
            layer = megamoe_layer(d, hidden, experts, top_k, mode, backend)
            layer.load_state_dict(proto.state_dict())
            return layer
        builders[f"megamoe[{backend}]"] = build
    if not args.no_hf:
        for impl in ("grouped_mm", "eager"):
            def build(impl=impl):
                block = hf_block(family, d, hidden, experts, top_k, impl)
                copy_megamoe_to_hf(proto, block)
                return block
            builders[f"hf[{impl}]"] = build

    # Build every variant, then time them round-robin (one fwd+bwd of each per round) so that
    # load from other processes on a shared machine hits all of them alike; median per variant.
    modules, inputs = {}, {}
    for name, build in builders.items():
        try:
            modules[name] = build().to(device=device, dtype=param_dtype).train()
            inp = x.to(device=device, dtype=param_dtype)
            inputs[name] = inp.unsqueeze(0) if name.startswith("hf") else inp
        except Exception as err:  # noqa: BLE001 - report and go on with the others
            print(f"{name:22s} failed to build: {type(err).__name__}: {err}")
    grad = torch.randn_like(x).to(device=device, dtype=param_dtype)
    times: dict[str, list[float]] = {n: [] for n in modules}
    extra: dict[str, float | None] = {n: None for n in modules}
    for r in range(args.warmup + args.iters):
        for name in list(modules):
            try:
                g = grad.unsqueeze(0) if name.startswith("hf") else grad
                seconds, mem = fwd_bwd_once(modules[name], inputs[name], g, amp, device)
            except Exception as err:  # noqa: BLE001 - report and go on with the others
                print(f"{name:22s} failed: {type(err).__name__}: {err}")
                del modules[name], times[name]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if r >= args.warmup:
                times[name].append(seconds)
                if mem is not None:
                    extra[name] = max(extra[name] or 0.0, mem)
    results = {}
    for name, ts in times.items():
        seconds = statistics.median(ts)
        results[name] = (seconds, flops / seconds / 1e12, param_gib(modules[name]), extra[name])

    base = results.get("dense_mlp", (None, None))[1]
    print(f"{'variant':22s} {'ms':>10s} {'TFLOP/s':>9s} {'vs dense':>9s} {'weights GiB':>12s} "
          f"{'fwd+bwd peak GiB':>17s}")
    for name, (seconds, tflops, wgib, mem) in results.items():
        ratio = tflops / base if base else float("nan")
        mem_s = f"{mem:17.2f}" if mem is not None else f"{'n/a':>17s}"
        print(f"{name:22s} {seconds * 1e3:10.2f} {tflops:9.3f} {ratio:9.3f} {wgib:12.3f} {mem_s}")
    for a, b in (("megamoe[grouped_mm]", "hf[grouped_mm]"), ("megamoe[grouped_mm]", "hf[eager]")):
        if a in results and b in results:
            print(f"ratio {a} / {b}: {results[a][1] / results[b][1]:.3f}")
    if not ok:
        print("CHECK FAILED: megamoe's layer does not match the transformers block")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
