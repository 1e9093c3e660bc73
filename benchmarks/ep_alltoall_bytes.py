#!/usr/bin/env python
"""Bytes moved by the expert-parallel all-to-all per training step, against the minimum.

    python benchmarks/ep_alltoall_bytes.py                  # world 2 (EP2) and world 4 (EP2xEDP2, EP4)
    python benchmarks/ep_alltoall_bytes.py --configs 2:2 4:4 --steps 3 --dtype bf16

Spawns real gloo process groups on CPU (fork), builds the tiny MoE of megamoe.config
preset("tiny") shrunk (d 64, 2 MoE layers, 8 experts top-2, seq 32, micro-batch 2 per rank),
applies expert parallelism the way training does (parallelize_model + gradient reducer +
AdamW) and runs full training steps (forward, backward, gradient reduction, optimizer step).

What is counted (nothing in megamoe is edited; the instrumentation is installed from outside):
  measured   torch.distributed.all_to_all_single is wrapped: for every call, the bytes this
             rank sends to *other* ranks (its own split stays local). Floating-point calls are
             the token rows (dispatch / combine, forward and backward); int64 calls without
             split sizes are the per-expert count exchange, reported separately.
  attributed AllToAllDispatcher.byte_counter (megamoe's own hook) splits the row bytes into
             dispatch / combine x fwd / bwd; it must agree with the wrapped total.
  minimum    each dispatcher's dispatch() is wrapped to see the routing it is given (after
             capacity dropping): R = number of (token, choice) slots whose expert lives on
             another EP rank. A step cannot move fewer than 4 x R x hidden x bytes-per-element:
             dispatch and combine in the forward, and their two transposes in the backward.
             bytes-per-element is that of the compute dtype (4 for fp32; 2 under --dtype bf16,
             where megamoe still ships fp32 activations in the dispatch and its backward, which
             shows up as a ratio above 1).
  dedup      also printed: the minimum if a token going to several experts on the same remote
             rank were sent once (one copy per (token, remote rank) pair, as DeepEP does).

Padding: megamoe's dispatcher sends exactly the split sizes of the routing (no capacity
padding, no alignment rows), so in fp32 the expected ratio measured/minimum is exactly 1.000.
Count exchange: one all_to_all_single of the int64 [E] counts per MoE layer per forward, i.e.
(ep-1)/ep x E x 8 bytes sent per rank.
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

DEFAULT_CONFIGS = ("2:2", "4:2", "4:4")   # world:ep


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
    """Wraps dist.all_to_all_single and every AllToAllDispatcher.dispatch of a model."""

    def __init__(self):
        self.phase = "fwd"
        self.rows: dict[str, int] = {}       # phase -> row bytes sent off-rank
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
        self.rows, self.counts, self.other = {}, {}, {}
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
            if input.is_floating_point():
                book = meter.rows
            elif input_split_sizes is None and input.dtype == torch.int64:
                book = meter.counts
            else:
                book = meter.other
            book[meter.phase] = book.get(meter.phase, 0) + sent
            meter.calls += 1
            return orig(output, input, output_split_sizes, input_split_sizes, group=group,
                        async_op=async_op)

        dist.all_to_all_single = counted

    def uninstall_collective(self) -> None:
        if self._orig is not None:
            dist.all_to_all_single = self._orig
            self._orig = None

    def install_dispatchers(self, model, compute_dtype: torch.dtype) -> None:
        from megamoe.moe.layer import MoELayer
        from megamoe.parallel.expert import AllToAllDispatcher

        for moe in [m for m in model.modules() if isinstance(m, MoELayer)]:
            d = moe.dispatcher
            if not isinstance(d, AllToAllDispatcher):
                continue
            d.byte_counter = {}
            self.dispatchers.append(d)
            ep_rank = dist.get_rank(d.ep_group)
            inner = d.dispatch            # bound method; the wrapper shadows it on the instance

            def dispatch(x, topk_idx, num_valid=None, _inner=inner, _d=d, _me=ep_rank):
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
                return _inner(x, topk_idx, num_valid)

            d.dispatch = dispatch

    def attributed(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for d in self.dispatchers:
            for k, v in (d.byte_counter or {}).items():
                total[k] = total.get(k, 0) + v
        return total

    def snapshot(self) -> dict:
        return {"rows": dict(self.rows), "counts": dict(self.counts), "other": dict(self.other),
                "attributed": self.attributed(), "remote_slots": self.remote_slots,
                "remote_pairs": self.remote_pairs, "slots": self.slots, "tokens": self.tokens,
                "hidden": self.hidden, "compute_bytes": self.compute_bytes}


# ------------------------------------------------------------------------------------ worker

def _worker(rank: int, world: int, ep: int, cfg, steps: int, dtype: str, seed: int) -> list[dict]:
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
    meter.install_dispatchers(model, compute_dtype)
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

def summarize(per_rank: list[dict], ep: int, num_experts: int, moe_layers: int) -> dict:
    """World totals of one step, the minimum and the ratios."""
    def tot(key, phase=None):
        return sum((r[key].get(phase, 0) if phase else r[key]) for r in per_rank)

    R = tot("remote_slots")
    pairs = tot("remote_pairs")
    hidden = per_rank[0]["hidden"]
    elem = per_rank[0]["compute_bytes"]
    transfer = R * hidden * elem                       # one direction, one pass
    fwd, bwd = tot("rows", "fwd"), tot("rows", "bwd")
    attributed: dict[str, int] = {}
    for r in per_rank:
        for k, v in r["attributed"].items():
            attributed[k] = attributed.get(k, 0) + v
    counts = sum(sum(r["counts"].values()) for r in per_rank)
    world = len(per_rank)
    counts_expected = world * moe_layers * (ep - 1) * (num_experts // ep) * 8
    measured = fwd + bwd + tot("rows", "optim")
    minimum = 4 * transfer
    dedup = 4 * pairs * hidden * elem
    return {
        "world": world, "ep": ep, "tokens": tot("tokens"), "slots": tot("slots"), "remote_slots": R,
        "remote_pairs": pairs, "hidden": hidden, "elem": elem,
        "fwd": fwd, "bwd": bwd, "measured": measured,
        "min_fwd": 2 * transfer, "min_bwd": 2 * transfer, "minimum": minimum, "dedup_minimum": dedup,
        "ratio": measured / minimum if minimum else float("nan"),
        "ratio_fwd": fwd / (2 * transfer) if transfer else float("nan"),
        "ratio_bwd": bwd / (2 * transfer) if transfer else float("nan"),
        "ratio_dedup": measured / dedup if dedup else float("nan"),
        "attributed": attributed, "attributed_total": sum(attributed.values()),
        "counts": counts, "counts_expected": counts_expected,
        "other": sum(sum(r["other"].values()) for r in per_rank),
    }


def measure(world: int, ep: int, steps: int = 1, dtype: str = "fp32", seed: int = 0, **cfg_kw) -> list[dict]:
    """Spawn `world` gloo ranks with EP `ep`, train `steps` steps; one summary per step."""
    cfg = tiny_cfg(**cfg_kw)
    moe_layers = cfg.model.num_layers
    per_step = spawn(world, _worker, ep, copy.deepcopy(cfg), steps, dtype, seed)
    return [summarize(ranks, ep, cfg.model.moe.num_experts, moe_layers) for ranks in per_step]


def _fmt(n: int) -> str:
    return f"{n:,d} B"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                    help="world:ep pairs (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="bf16 = CPU autocast (bf16 expert GEMMs, fp32 master weights)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=0.0, help="0 = dropless")
    args = ap.parse_args(argv)

    kw = dict(d_model=args.d_model, experts=args.experts, top_k=args.top_k, seq=args.seq,
              micro_batch=args.micro_batch, capacity_factor=args.capacity_factor)
    cfg = tiny_cfg(**kw)
    print(f"EP all-to-all bytes per training step (fwd + bwd + grad reduce + AdamW), gloo on CPU; "
          f"tiny MoE: d {args.d_model}, {cfg.model.num_layers} MoE layers, {args.experts} experts "
          f"top-{args.top_k}, {args.micro_batch}x{args.seq} tokens per rank, {args.dtype}, "
          f"capacity factor {args.capacity_factor or 'dropless'}")
    print("minimum = 4 passes (dispatch + combine, fwd and bwd) x remote token copies x hidden x "
          "bytes/elem; bytes counted = sent to other ranks (world totals)")
    summary = []
    for spec in args.configs:
        world, ep = (int(v) for v in spec.split(":"))
        steps = measure(world, ep, args.steps, args.dtype, **kw)
        for i, s in enumerate(steps):
            label = f"world {world} ep {ep} (edp {world // ep}) step {i + 1}"
            print(f"\n{label}: {s['tokens']} tokens x {cfg.model.num_layers} layers = {s['slots']} routed "
                  f"copies, {s['remote_slots']} to another rank ({s['remote_pairs']} distinct token->rank pairs)")
            print(f"  rows fwd    measured {_fmt(s['fwd']):>14s}  minimum {_fmt(s['min_fwd']):>14s}  "
                  f"ratio {s['ratio_fwd']:.3f}")
            print(f"  rows bwd    measured {_fmt(s['bwd']):>14s}  minimum {_fmt(s['min_bwd']):>14s}  "
                  f"ratio {s['ratio_bwd']:.3f}")
            print(f"  rows total  measured {_fmt(s['measured']):>14s}  minimum {_fmt(s['minimum']):>14s}  "
                  f"ratio {s['ratio']:.3f}   (vs one copy per token->rank pair: {s['ratio_dedup']:.3f})")
            attr = ", ".join(f"{k} {v:,d}" for k, v in sorted(s["attributed"].items()))
            agree = "agrees" if s["attributed_total"] == s["measured"] else "DISAGREES"
            print(f"  dispatcher byte_counter {agree}: {attr}")
            print(f"  count exchange (int64 [E], fwd): measured {_fmt(s['counts'])}, expected "
                  f"{_fmt(s['counts_expected'])}; other all_to_all_single traffic {_fmt(s['other'])}")
            summary.append((label, s))
    print("\nratio measured/minimum per configuration (1.000 = no wasted bytes; no padding by design)")
    for label, s in summary:
        print(f"  {label:36s} ratio {s['ratio']:.3f}  fwd {s['ratio_fwd']:.3f}  bwd {s['ratio_bwd']:.3f}  "
              f"dedup-ratio {s['ratio_dedup']:.3f}  count-exchange {s['counts']:,d} B")


if __name__ == "__main__":
    main()
