#!/usr/bin/env python
"""Does the expert-parallel all-to-all overlap expert compute? A profiler trace says.

    python benchmarks/ep_overlap.py                      # EP2 on CPU (gloo), chunks 1 and 2
    python benchmarks/ep_overlap.py --trace-dir traces   # also write Chrome traces (chrome://tracing)

Two gloo processes each run one MoE layer (a shared expert, top-2 of 8 experts, expert
parallelism 2) forward and backward, once with one token chunk (parallel.ep_overlap_chunks 1)
and once with two, under torch.profiler. gloo runs an asynchronous collective on its own thread,
so the trace holds each exchange as a `gloo:all_to_all` interval on that thread, next to the
compute on the main thread. Reported, for rank 0, per iteration:
  a2a_ms            wall time of the exchanges (union of their intervals)
  overlapped_frac   the share of that time during which the main thread runs compute (GEMMs and
                    the other aten ops of the layer, not waits)
  main_thread_idle  the profiled step's main-thread time outside any aten op: waiting for an
                    exchange (or for the slower peer)
  step_ms           median forward + backward time over the timed iterations
An exchange's interval runs from when gloo's thread starts it until the peer's data is in,
so it includes waiting for a slower peer (the ranks' expert loads differ).
The last line is `overlapped_frac_chunks2 X chunks1 Y idle_ratio_chunks2_vs_1 I
step_time_ratio_chunks2_vs_1 R`.

CPU numbers show the schedule, not GPU speed: with 2 cores the gloo thread competes with the
compute for a core, so a higher overlap need not mean a faster step here. On GPUs NCCL runs on
its own stream (benchmarks/RESULTS.md, "GPU").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megamoe.parallel.spawn import spawn  # noqa: E402

COMM = ("gloo:all_to_all",)


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs, ys) -> float:
    total, j = 0.0, 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            total += max(0.0, min(b, ys[k][1]) - max(a, ys[k][0]))
            k += 1
    return total


def overlap_of(events, main_thread: int) -> dict:
    """Of one profiled step: the exchanges' wall time (us), the share of it during which the
    main thread computes, and the main thread's idle time (waiting for an exchange or a peer)."""
    comm = _union([(e.time_range.start, e.time_range.end) for e in events if e.name in COMM])
    main = [e for e in events if e.thread == main_thread]
    compute = _union([(e.time_range.start, e.time_range.end) for e in main if e.name.startswith("aten::")])
    span = max(e.time_range.end for e in main) - min(e.time_range.start for e in main)
    total = _length(comm)
    return {"a2a_us": total, "frac": _intersection(comm, compute) / total if total else 0.0,
            "idle_us": span - _length(compute)}


def _worker(rank, world, args):
    import threading

    from torch.profiler import ProfilerActivity, profile

    from megamoe.config import MoEConfig
    from megamoe.moe.layer import MoELayer
    from megamoe.parallel.mesh import ParallelMesh, make_layout
    from megamoe.parallel.parallelize import apply_ep

    cfg = MoEConfig(num_experts=8, top_k=2, expert_hidden=args.expert_hidden, num_shared_experts=1,
                    gemm_backend="grouped_mm")
    torch.manual_seed(0)
    layer = MoELayer(args.d_model, cfg)
    holder = torch.nn.Module()
    holder.moe = layer
    apply_ep(holder, ParallelMesh(make_layout(world, ep=world), rank))
    layer.train()
    x = torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(rank),
                    requires_grad=True)
    main = threading.get_native_id()
    out = {}
    for chunks in (1, 2):
        layer.dispatcher.chunks = chunks

        def step():
            layer(x).square().mean().backward()

        for _ in range(2):
            step()
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        events = list(prof.events())
        tids = {e.thread for e in events if e.name.startswith("aten::")}
        # the main thread is the one that ran the layer's first op (profiler thread ids are
        # the system's on Linux; fall back to the busiest thread otherwise)
        main_tid = main if main in tids else max(tids, key=lambda t: sum(e.thread == t for e in events))
        o = overlap_of(events, main_tid)
        if args.trace_dir and rank == 0:
            os.makedirs(args.trace_dir, exist_ok=True)
            prof.export_chrome_trace(os.path.join(args.trace_dir, f"ep2_chunks{chunks}.json"))
        out[chunks] = dict(step_ms=1e3 * statistics.median(times), a2a_ms=o["a2a_us"] / 1e3,
                           frac=o["frac"], idle_ms=o["idle_us"] / 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--trace-dir", default="")
    args = p.parse_args()
    res = spawn(2, _worker, args)
    print(f"EP2 on CPU (gloo), one MoE layer: {args.tokens} tokens, d_model {args.d_model}, "
          f"8 experts top-2, expert_hidden {args.expert_hidden}, 1 shared expert (rank 0)")
    for chunks, r in res.items():
        print(f"  chunks {chunks}: step_ms {r['step_ms']:.1f}  a2a_ms {r['a2a_ms']:.1f}  "
              f"overlapped_frac {r['frac']:.3f}  main_thread_idle_ms {r['idle_ms']:.1f}")
    print(f"overlapped_frac_chunks2 {res[2]['frac']:.3f} chunks1 {res[1]['frac']:.3f} "
          f"idle_ratio_chunks2_vs_1 {res[2]['idle_ms'] / max(res[1]['idle_ms'], 1e-9):.3f} "
          f"step_time_ratio_chunks2_vs_1 {res[2]['step_ms'] / res[1]['step_ms']:.3f}")


if __name__ == "__main__":
    main()
