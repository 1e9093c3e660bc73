#!/usr/bin/env python
"""Bytes moved by the expert-parallel all-to-all per training step, against the minimum.

    python benchmarks/ep_alltoall_bytes.py        # world 2 (EP2), world 4 (EP2xEDP2, EP4), EP4 top-8 of 64
    python benchmarks/ep_alltoall_bytes.py --configs 2:2 4:4:4 --steps 3 --dtype bf16
    python benchmarks/ep_alltoall_bytes.py --per-expert     # the old dispatch: one copy per expert

A configuration is world:ep[:top_k[:experts]] (top_k and experts default to --top-k, --experts).

Spawns real gloo process groups on CPU (fork), builds the tiny MoE of megamoe.config
preset("tiny") shrunk (d 64, 2 MoE layers, 8 experts top-2, seq 32, micro-batch 2 per rank),
applies expert parallelism the way training does (parallelize_model + gradient reducer +
AdamW) and runs full training steps (forward, backward, gradient reduction, optimizer step).

What is counted (nothing in megamoe is edited; the instrumentation is installed from outside):
  measured   torch.distributed.all_to_all_single is wrapped: for every call, the bytes this
             rank sends to *other* ranks (its own split stays local). Floating-point calls whose
             rows are `hidden` wide are the token rows (dispatch / combine, forward and
             backward); the routing metadata of the deduplicated dispatch (each (token, rank)
             pair's K local expert ids, int8, and K routing weights with their gradients, fp32)
             is reported separately; int64 calls without split sizes are the count exchange.
  attributed AllToAllDispatcher.byte_counter (megamoe's own hook) splits the bytes into
             dispatch / combine (rows) and dispatch_ids / combine_weights (metadata) x fwd /
             bwd; its row keys must agree with the wrapped row total.
  dedup minimum
             each dispatcher's dispatch_start() is wrapped to see the routing it is given (after
             capacity dropping): pairs = distinct (token, remote EP rank) pairs, a token that
             goes to several experts on one remote rank counted once (as DeepEP sends it). A
             step cannot move fewer rows than 4 x pairs x hidden x bytes-per-element: dispatch
             and combine in the forward, their two transposes in the backward (bytes-per-element
             of the compute dtype: 4 for fp32, 2 under --dtype bf16; there the combine forward
             ships fp32 partial sums, so bf16 runs measure 1.25 x the bf16 minimum unless the
             dispatcher's low_precision_partials is set, see megamoe.parallel.expert). megamoe's dispatcher
             (dedup, the default) sends exactly that: the final line is
             `bytes_vs_dedup_minimum X`, measured row bytes / dedup minimum over all
             configurations and steps (1.000 = nothing wasted).
  per-expert minimum
             the reference of the old dispatch (--per-expert measures it): R = (token, choice)
             slots whose expert lives on another EP rank, 4 x R x hidden x bytes-per-element.
             measured / per-expert minimum < 1 is the saving of the deduplication.

Padding: none (exact split sizes, no capacity padding, no alignment rows).
Count exchange: one all_to_all_single of int64 counts per MoE layer per forward: [E/ep] slots
per expert + 1 pair count per destination rank, i.e. (ep-1) x (E/ep + 1) x 8 bytes sent per
rank ((ep-1) x E/ep x 8 with --per-expert).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megamoe.config import preset  # noqa: E402
from megamoe.parallel.spawn import spawn  # noqa: E402

DEFAULT_CONFIGS = ("2:2", "4:2", "4:4", "4:4:8:64")   # world:ep[:top_k[:experts]]


def tiny_cfg(d_model: int = 64, layers: int = 2, experts: int = 8, top_k: int = 2, hidden: int = 32,
             seq: int = 32, micro_batch: int = 2, capacity_factor: float = 0.0):
    """preset("tiny") shrunk to a few-second CPU run (every layer MoE)."""
    cfg = preset("tiny")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 256, d_model, layers, 4, 2
    m.ffn_hidden, m.seq_length = 128, seq
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden = experts, top_k, hidden
    m.moe.capacity_factor = capacity_factor
    m.moe.first_k_dense = 0
    cfg.micro_batch_size = micro_batch
    return cfg


# ------------------------------------------------------------------------------- instrumentation

class ByteMeter:
    """Wraps dist.all_to_all_single and every AllToAllDispatcher.dispatch_start of a model."""

    def __init__(self):
        self.phase = "fwd"
        self.rows: dict[str, int] = {}       # phase -> row bytes sent off-rank
        self.meta: dict[str, int] = {}       # phase -> routing-metadata bytes (ids, weights)
        self.counts: dict[str, int] = {}     # phase -> count-exchange bytes sent off-rank
        self.other: dict[str, int] = {}      # anything else through all_to_all_single
        self.calls = 0
        self.remote_slots = 0                # R of this rank's routing (summed over layers)
        self.remote_pairs = 0                # distinct (token, remote EP rank) pairs
        self.slots = 0
        self.tokens = 0
        self.hidden = 0
        self.compute_bytes = 0               # bytes per element of the compute dtype
        self.dispatchers = []
        self._orig = None

    def reset(self) -> None:
        self.rows, self.meta, self.counts, self.other = {}, {}, {}, {}
        self.calls = self.remote_slots = self.remote_pairs = self.slots = self.tokens = 0
        for d in self.dispatchers:
            d.byte_counter = {}

    # torch.distributed.all_to_all_single(output, input, output_split_sizes=None,
    #                                     input_split_sizes=None, group=None, async_op=False)
    def install_collective(self) -> None:
        orig = self._orig = dist.all_to_all_single
        meter = self

        def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                    async_op=False):
            n, me = dist.get_world_size(group), dist.get_rank(group)
            elem = input.element_size()
            if input_split_sizes is None:                   # equal split of dim 0
                per_rank = input.numel() // n
                sent = per_rank * (n - 1) * elem
            else:
                row = input[0].numel() if input.shape[0] else 0
                sent = sum(s for j, s in enumerate(input_split_sizes) if j != me) * row * elem
            if input_split_sizes is None:
                book = meter.counts if input.dtype == torch.int64 else meter.other
            elif input.is_floating_point() and input.dim() == 2 and input.shape[1] == meter.hidden:
                book = meter.rows
            else:
                book = meter.meta                           # [P, K] ids or routing weights
            book[meter.phase] = book.get(meter.phase, 0) + sent
            meter.calls += 1
            return orig(output, input, output_split_sizes, input_split_sizes, group=group,
                        async_op=async_op)

        dist.all_to_all_single = counted

    def uninstall_collective(self) -> None:
        if self._orig is not None:
            dist.all_to_all_single = self._orig
            self._orig = None

    def install_dispatchers(self, model, compute_dtype: torch.dtype, dedup: bool = True) -> None:
        from megamoe.moe.layer import MoELayer
        from megamoe.parallel.expert import AllToAllDispatcher

        for moe in [m for m in model.modules() if isinstance(m, MoELayer)]:
            d = moe.dispatcher
            if not isinstance(d, AllToAllDispatcher):
                continue
            d.byte_counter = {}
            d.dedup = dedup
            self.dispatchers.append(d)
            ep_rank = dist.get_rank(d.ep_group)
            inner = d.dispatch_start      # bound method; the wrapper shadows it on the instance

            def dispatch_start(x, topk_idx, num_valid=None, chunks=None, _inner=inner, _d=d, _me=ep_rank):
                if torch.is_grad_enabled():        # not when run again under no_grad elsewhere
                    valid = topk_idx >= 0
                    dest = torch.where(valid, topk_idx // _d.num_local, -1)     # [T, K] EP rank
                    remote = valid & (dest != _me)
                    self.remote_slots += int(remote.sum())
                    onehot = F.one_hot(dest.clamp(min=0), _d.ep).bool() & remote.unsqueeze(-1)
                    self.remote_pairs += int(onehot.any(dim=1).sum())            # [T, ep] -> pairs
                    self.slots += int(valid.sum())
                    self.tokens += topk_idx.shape[0]
                    self.hidden = x.shape[-1]
                    self.compute_bytes = torch.empty(0, dtype=compute_dtype).element_size()
                return _inner(x, topk_idx, num_valid, chunks)

            d.dispatch_start = dispatch_start

    def attributed(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for d in self.dispatchers:
            for k, v in (d.byte_counter or {}).items():
                total[k] = total.get(k, 0) + v
        return total

    def snapshot(self) -> dict:
        return {"rows": dict(self.rows), "meta": dict(self.meta), "counts": dict(self.counts),
                "other": dict(self.other),
                "attributed": self.attributed(), "remote_slots": self.remote_slots,
                "remote_pairs": self.remote_pairs, "slots": self.slots, "tokens": self.tokens,
                "hidden": self.hidden, "compute_bytes": self.compute_bytes}


# ------------------------------------------------------------------------------------ worker

def _worker(rank: int, world: int, ep: int, cfg, steps: int, dtype: str, seed: int,
            dedup: bool = True) -> list[dict]:
    """Train `steps` steps under EP; returns per-step snapshots of every rank (on rank 0)."""
    from megamoe.model.transformer import build_model
    from megamoe.parallel.mesh import ParallelMesh, make_layout
    from megamoe.parallel.parallelize import parallelize_model
    from megamoe.parallel.setup import build_data_parallel

    mesh = ParallelMesh(make_layout(world, ep=ep), rank)
    model = build_model(cfg.model, seed=cfg.seed)
    model, _ = parallelize_model(model, mesh)
    optimizer, grads = build_data_parallel(model, mesh, cfg.optim, zero1=False)
    compute_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    meter = ByteMeter()
    meter.install_dispatchers(model, compute_dtype, dedup)
    meter.install_collective()
    gen = torch.Generator().manual_seed(seed + 1000 * mesh.rank_in("dp"))
    out = []
    try:
        for _ in range(steps):
            data = torch.randint(0, cfg.model.vocab_size, (cfg.micro_batch_size, cfg.model.seq_length + 1),
                                 generator=gen)
            inputs, labels = data[:, :-1], data[:, 1:]
            meter.reset()
            optimizer.zero_grad(set_to_none=True)
            meter.phase = "fwd"
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                logits = model(inputs)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
            meter.phase = "bwd"
            loss.backward()
            meter.phase = "optim"
            grads.reduce_grads()
            optimizer.step()
            snap = meter.snapshot()
            everyone = [None] * world
            dist.all_gather_object(everyone, snap)
            out.append(everyone)
    finally:
        meter.uninstall_collective()
    return out


# ------------------------------------------------------------------------------- arithmetic

def summarize(per_rank: list[dict], ep: int, num_experts: int, moe_layers: int,
              dedup: bool = True) -> dict:
    """World totals of one step, the minima and the ratios."""
    def tot(key, phase=None):
        return sum((r[key].get(phase, 0) if phase else r[key]) for r in per_rank)

    R = tot("remote_slots")
    pairs = tot("remote_pairs")
    hidden = per_rank[0]["hidden"]
    elem = per_rank[0]["compute_bytes"]
    per_expert_transfer = R * hidden * elem           # one direction, one pass, one copy per expert
    dedup_transfer = pairs * hidden * elem            # one copy per (token, remote rank) pair
    fwd, bwd = tot("rows", "fwd"), tot("rows", "bwd")
    attributed: dict[str, int] = {}
    for r in per_rank:
        for k, v in r["attributed"].items():
            attributed[k] = attributed.get(k, 0) + v
    row_keys = ("dispatch.", "combine.")
    attributed_rows = sum(v for k, v in attributed.items() if k.startswith(row_keys))
    counts = sum(sum(r["counts"].values()) for r in per_rank)
    meta = sum(sum(r["meta"].values()) for r in per_rank)
    world = len(per_rank)
    counts_expected = world * moe_layers * (ep - 1) * (num_experts // ep + (1 if dedup else 0)) * 8
    measured = fwd + bwd + tot("rows", "optim")
    minimum = 4 * per_expert_transfer
    dedup_minimum = 4 * dedup_transfer
    nan = float("nan")
    return {
        "world": world, "ep": ep, "dedup": dedup, "tokens": tot("tokens"), "slots": tot("slots"),
        "remote_slots": R, "remote_pairs": pairs, "hidden": hidden, "elem": elem,
        "fwd": fwd, "bwd": bwd, "measured": measured,
        "min_fwd": 2 * per_expert_transfer, "min_bwd": 2 * per_expert_transfer, "minimum": minimum,
        "dedup_min_fwd": 2 * dedup_transfer, "dedup_min_bwd": 2 * dedup_transfer,
        "dedup_minimum": dedup_minimum,
        "ratio": measured / minimum if minimum else nan,
        "ratio_fwd": fwd / (2 * per_expert_transfer) if R else nan,
        "ratio_bwd": bwd / (2 * per_expert_transfer) if R else nan,
        "ratio_dedup": measured / dedup_minimum if dedup_minimum else nan,
        "ratio_dedup_fwd": fwd / (2 * dedup_transfer) if pairs else nan,
        "ratio_dedup_bwd": bwd / (2 * dedup_transfer) if pairs else nan,
        "dedup_factor": R / pairs if pairs else nan,
        "meta": meta, "meta_share": meta / measured if measured else nan,
        "attributed": attributed, "attributed_total": sum(attributed.values()),
        "attributed_rows": attributed_rows,
        "counts": counts, "counts_expected": counts_expected,
        "other": sum(sum(r["other"].values()) for r in per_rank),
    }


def parse_config(spec: str, top_k: int, experts: int) -> tuple[int, int, int, int]:
    """"world:ep[:top_k[:experts]]" -> (world, ep, top_k, experts)."""
    parts = [int(v) for v in spec.split(":")]
    if not 2 <= len(parts) <= 4:
        raise ValueError(f"configuration {spec!r}: expected world:ep[:top_k[:experts]]")
    parts += [top_k, experts][len(parts) - 2:]
    return tuple(parts)


def measure(world: int, ep: int, steps: int = 1, dtype: str = "fp32", seed: int = 0,
            dedup: bool = True, **cfg_kw) -> list[dict]:
    """Spawn `world` gloo ranks with EP `ep`, train `steps` steps; one summary per step."""
    cfg = tiny_cfg(**cfg_kw)
    moe_layers = cfg.model.num_layers
    per_step = spawn(world, _worker, ep, copy.deepcopy(cfg), steps, dtype, seed, dedup)
    return [summarize(ranks, ep, cfg.model.moe.num_experts, moe_layers, dedup) for ranks in per_step]


def _fmt(n: int) -> str:
    return f"{n:,d} B"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                    help="world:ep[:top_k[:experts]] (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="bf16 = CPU autocast (bf16 expert GEMMs, fp32 master weights)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=0.0, help="0 = dropless")
    ap.add_argument("--per-expert", action="store_true",
                    help="measure the old dispatch (one copy per expert) instead of the dedup one")
    args = ap.parse_args(argv)

    dedup = not args.per_expert
    base = dict(d_model=args.d_model, seq=args.seq, micro_batch=args.micro_batch,
                capacity_factor=args.capacity_factor)
    cfg = tiny_cfg(**base)
    print(f"EP all-to-all bytes per training step (fwd + bwd + grad reduce + AdamW), gloo on CPU; "
          f"tiny MoE: d {args.d_model}, {cfg.model.num_layers} MoE layers, {args.micro_batch}x{args.seq} "
          f"tokens per rank, {args.dtype}, capacity factor {args.capacity_factor or 'dropless'}; "
          f"dispatch: {'dedup (one copy per token and EP rank)' if dedup else 'per-expert (one copy per expert)'}")
    print("dedup minimum = 4 passes (dispatch + combine, fwd and bwd) x remote (token, rank) pairs x "
          "hidden x bytes/elem; per-expert minimum = the same with remote (token, expert) copies; "
          "bytes counted = sent to other ranks (world totals)")
    summary = []
    for spec in args.configs:
        world, ep, top_k, experts = parse_config(spec, args.top_k, args.experts)
        steps = measure(world, ep, args.steps, args.dtype, dedup=dedup, top_k=top_k, experts=experts, **base)
        for i, s in enumerate(steps):
            label = f"world {world} ep {ep} (edp {world // ep}) E{experts} top-{top_k} step {i + 1}"
            print(f"\n{label}: {s['tokens']} tokens x {cfg.model.num_layers} layers = {s['slots']} routed "
                  f"copies, {s['remote_slots']} to another rank ({s['remote_pairs']} distinct token->rank "
                  f"pairs, {s['dedup_factor']:.2f} copies per pair)")
            print(f"  rows fwd    measured {_fmt(s['fwd']):>14s}  dedup minimum {_fmt(s['dedup_min_fwd']):>14s}  "
                  f"ratio {s['ratio_dedup_fwd']:.3f}  (per-expert minimum {_fmt(s['min_fwd'])}: {s['ratio_fwd']:.3f})")
            print(f"  rows bwd    measured {_fmt(s['bwd']):>14s}  dedup minimum {_fmt(s['dedup_min_bwd']):>14s}  "
                  f"ratio {s['ratio_dedup_bwd']:.3f}  (per-expert minimum {_fmt(s['min_bwd'])}: {s['ratio_bwd']:.3f})")
            print(f"  rows total  measured {_fmt(s['measured']):>14s}  dedup minimum {_fmt(s['dedup_minimum']):>14s}  "
                  f"ratio {s['ratio_dedup']:.3f}  (per-expert minimum {_fmt(s['minimum'])}: {s['ratio']:.3f})")
            print(f"  routing metadata (local expert ids + routing weights and their gradients): "
                  f"{_fmt(s['meta'])} = {100 * s['meta_share']:.1f}% of the row bytes")
            attr = ", ".join(f"{k} {v:,d}" for k, v in sorted(s["attributed"].items()))
            agree = "agrees" if s["attributed_rows"] == s["measured"] and \
                s["attributed_total"] == s["measured"] + s["meta"] else "DISAGREES"
            print(f"  dispatcher byte_counter {agree}: {attr}")
            print(f"  count exchange (int64, fwd): measured {_fmt(s['counts'])}, expected "
                  f"{_fmt(s['counts_expected'])}; other all_to_all_single traffic {_fmt(s['other'])}")
            summary.append((label, s))
    print("\nper configuration: rows measured / dedup minimum (1.000 = one copy per token and remote "
          "rank, nothing wasted), and / per-expert minimum (the old dispatch's floor)")
    for label, s in summary:
        print(f"  {label:48s} vs-dedup {s['ratio_dedup']:.3f} (fwd {s['ratio_dedup_fwd']:.3f} bwd "
              f"{s['ratio_dedup_bwd']:.3f})  vs-per-expert {s['ratio']:.3f}  copies/pair "
              f"{s['dedup_factor']:.2f}  metadata {100 * s['meta_share']:.1f}%  count-exchange {s['counts']:,d} B")
    measured = sum(s["measured"] for _, s in summary)
    dedup_min = sum(s["dedup_minimum"] for _, s in summary)
    print(f"bytes_vs_dedup_minimum {measured / dedup_min if dedup_min else float('nan'):.3f}")


if __name__ == "__main__":
    main()
