"""Token permutation (permute + unpermute, forward + backward): the C++/CUDA extension vs the
pure-PyTorch fallback, measured in the same run; prints the time of each and the ratio.

    python benchmarks/permute.py                      # T 4096, K 8, E 64, H 512 (OLMoE-like routing)
    python benchmarks/permute.py --dtype bf16 --tokens 16384 --hidden 2048

Both backends are selected through MEGAMOE_OPS_BACKEND (read on every op call), so the same
megamoe.ops functions are timed; the outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from megamoe import ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(tokens, top_k, experts, hidden, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_(True)
    topk = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices.to(device)
    w = torch.rand(tokens, top_k, generator=g).to(device, dtype).requires_grad_(True)
    return x, topk, w


def run_once(x, topk, w, experts):
    """permute -> (stand-in expert op) -> unpermute, then backward; returns the output."""
    x_perm, perm_map, _ = ops.permute(x, topk, experts)
    y = ops.unpermute(x_perm * 2.0, perm_map, w)
    y.float().square().mean().backward()
    return y


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_run(name, inputs, experts, device) -> float:
    os.environ["MEGAMOE_OPS_BACKEND"] = name
    x, topk, w = inputs
    x.grad = w.grad = None
    sync(device)
    t0 = time.perf_counter()
    run_once(x, topk, w, experts)
    sync(device)
    return time.perf_counter() - t0


def check_equal(args, device, dtype):
    outs = {}
    for name in ("torch", "ext"):
        os.environ["MEGAMOE_OPS_BACKEND"] = name
        x, topk, w = make_inputs(args.tokens, args.top_k, args.experts, args.hidden, dtype, device)
        y = run_once(x, topk, w, args.experts)
        outs[name] = (y.detach().float(), x.grad.float(), w.grad.float())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b, what in zip(outs["torch"], outs["ext"], ("y", "d_x", "d_w")):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=f"backends differ on {what}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    os.environ["MEGAMOE_OPS_BACKEND"] = "auto"
    if ops.backend(device) == "torch":
        raise SystemExit(f"benchmarks/permute.py: the C++ extension does not cover {device.type} here; "
                         "build it with `pip install --no-build-isolation -e .`")
    check_equal(args, device, dtype)
    print(f"permute+unpermute fwd+bwd: T {args.tokens}, K {args.top_k}, E {args.experts}, H {args.hidden}, "
          f"{args.dtype}, {device} (outputs of both backends checked equal)")
    inputs = make_inputs(args.tokens, args.top_k, args.experts, args.hidden, dtype, device)
    results = {"torch": [], "ext": []}
    for i in range(args.warmup + args.iters):
        for name, times in results.items():   # alternate so machine load hits both alike
            t = timed_run(name, inputs, args.experts, device)
            if i >= args.warmup:
                times.append(t)
    torch_ms = statistics.median(results["torch"]) * 1e3
    ext_ms = statistics.median(results["ext"]) * 1e3
    print(f"torch fallback  {torch_ms:9.2f} ms")
    print(f"extension       {ext_ms:9.2f} ms")
    print(f"ratio torch / extension: {torch_ms / ext_ms:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
