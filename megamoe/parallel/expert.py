"""Expert parallelism: the all-to-all token dispatcher and expert-weight sharding.

Legend: T local tokens, K top-k, H hidden, E experts in total, El = E/ep experts on this rank,
I expert hidden, Il = I/etp its slice under expert-TP, N rows.

AllToAllDispatcher has LocalDispatcher's API (megamoe.moe.dispatch):
  dispatch(x[T, H], topk_idx[T, K], num_valid=None) -> x_local[N_in, H] expert-major over this rank's El experts,
                                       counts_local[El], ctx
  combine(y_local[N_in, H], topk_weight[T, K], ctx) -> y[T, H]
Steps of dispatch:
  1. count slots per expert and start exchanging the [E] counts (async all_to_all_single)
  2. permute locally, expert-major over ALL E experts (rows for EP rank j are contiguous),
     while the counts travel; then ONE device-to-host transfer of all split sizes
     (the only host sync of the layer's forward; backward reuses them)
  3. exchange rows (differentiable all-to-all with split sizes); rows arrive grouped by
     source rank, then by local expert
  4. expert-TP: all-gather the received rows over the etp group (each etp rank holds a slice
     of every local expert's hidden dim, so each needs every row)
  5. regroup the rows expert-major (stable: source order kept inside an expert)
combine runs the exact reverse; under expert-TP the partial outputs of the etp ranks (each
over its Il slice) are summed and scattered back (reduce-scatter over etp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from megamoe import ops
from megamoe.parallel import collectives as C
from megamoe.parallel.guard import guarded
from megamoe.parallel.params import set_spec


@dataclass
class _DispatchCtx:
    perm_map: torch.Tensor       # local permutation (ops.permute)
    order: torch.Tensor          # received (block-major) row -> expert-major position
    send_splits: list[int]       # rows to each EP rank
    recv_splits: list[int]       # rows from each EP rank
    etp_splits: list[int]        # rows each etp peer contributed to the gathered buffer


class AllToAllDispatcher:
    def __init__(self, num_experts: int, ep_group, etp_group=None):
        self.num_experts = num_experts
        self.ep_group, self.etp_group = ep_group, etp_group
        self.ep = C.group_size(ep_group)
        self.etp = C.group_size(etp_group) if etp_group is not None else 1
        if num_experts % self.ep:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep ({self.ep})")
        self.num_local = num_experts // self.ep
        # Benchmarks set this to a dict; every exchange then adds the bytes it sends off-rank.
        self.byte_counter: dict | None = None

    # ------------------------------------------------------------------------------ counting
    def _counter(self, key: str, group):
        if self.byte_counter is None:
            return None
        me = C.group_rank(group)

        def on_send(t: torch.Tensor, splits: list[int], backward: bool):
            rows = sum(n for j, n in enumerate(splits) if j != me)
            row_bytes = t[0].numel() * t.element_size() if t.shape[0] else 0
            name = f"{key}.{'bwd' if backward else 'fwd'}"
            self.byte_counter[name] = self.byte_counter.get(name, 0) + rows * row_bytes
        return on_send

    # ------------------------------------------------------------------------------ dispatch
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_valid: int | None = None):
        # 1. per-expert counts, and their exchange started before the permutation it overlaps
        counts = expert_counts(topk_idx, self.num_experts)                   # [E] int64
        recv_counts, work = torch.empty_like(counts), None
        if self.ep > 1:
            with guarded(self.ep_group):
                work = dist.all_to_all_single(recv_counts, counts, group=self.ep_group, async_op=True)
        else:
            recv_counts.copy_(counts)
        # 2. local permutation (rows for EP rank j contiguous) while the counts travel
        x_perm, perm_map, _ = ops.permute(x, topk_idx, self.num_experts, num_valid)  # [N, H]
        if work is not None:
            with guarded(self.ep_group):
                work.wait()
        block_counts = recv_counts.view(self.ep, self.num_local)          # [ep, El] rows I receive
        if self.etp > 1:   # every etp peer's received blocks: [etp*ep, El]
            gathered = block_counts.new_empty((self.etp * self.ep, self.num_local))
            C.all_gather_flat(gathered, block_counts.contiguous(), self.etp_group)
            block_counts = gathered
        # The layer's one device-to-host transfer: send, receive (and etp) split sizes together.
        # Backward reuses them (saved in ctx and by the all-to-all functions): no transfer there.
        splits = host_ints(torch.cat([counts.view(self.ep, -1).sum(1),          # rows to each EP rank
                                      recv_counts.view(self.ep, -1).sum(1),     # rows from each
                                      block_counts.view(self.etp, -1).sum(1)]))  # rows per etp peer
        send_splits, recv_splits = splits[:self.ep], splits[self.ep:2 * self.ep]
        etp_splits = splits[2 * self.ep:]
        # 3. rows to the ranks owning their experts
        x_recv = C.all_to_all(x_perm, self.ep_group, send_splits, recv_splits,
                              self._counter("dispatch", self.ep_group))
        # 4. expert-TP: every etp rank needs every row of its experts
        if self.etp > 1:
            mine = x_recv.shape[0]
            # all-gather of unequal sizes = all-to-all sending the same rows to every peer; its
            # backward sums the gradients of the copies (the reduce-scatter we need).
            x_recv = C.all_to_all(x_recv.repeat(self.etp, 1), self.etp_group, [mine] * self.etp,
                                  etp_splits, self._counter("etp_gather", self.etp_group))
        # 5. block-major (source, expert) -> expert-major
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_local, device=x.device).repeat(block_counts.shape[0]),
            block_counts.flatten().to(x.device), output_size=x_recv.shape[0])  # size known: no sync
        order = torch.argsort(expert_of_row, stable=True)
        x_local = x_recv.index_select(0, order)
        counts_local = block_counts.sum(0).to(counts.device)
        return x_local, counts_local, _DispatchCtx(perm_map, order, send_splits, recv_splits, etp_splits)

    # ------------------------------------------------------------------------------- combine
    def combine(self, y_local: torch.Tensor, topk_weight: torch.Tensor, ctx: _DispatchCtx) -> torch.Tensor:
        inverse = torch.empty_like(ctx.order)
        inverse[ctx.order] = torch.arange(ctx.order.numel(), device=ctx.order.device)
        y_recv = y_local.index_select(0, inverse)                     # back to block-major
        if self.etp > 1:
            me = C.group_rank(self.etp_group)
            mine = ctx.etp_splits[me]
            # Each peer's block gets this rank's partial sum over its Il slice; sum the partials.
            parts = C.all_to_all(y_recv, self.etp_group, ctx.etp_splits, [mine] * self.etp,
                                 self._counter("etp_reduce_scatter", self.etp_group))
            y_recv = parts.view(self.etp, mine, -1).sum(0)
        y_perm = C.all_to_all(y_recv, self.ep_group, ctx.recv_splits, ctx.send_splits,
                              self._counter("combine", self.ep_group))
        return ops.unpermute(y_perm, ctx.perm_map, topk_weight)


# ----------------------------------------------------------------------------- helpers

def expert_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64 slots routed to each expert (dropped slots, -1, not counted); on the device,
    with scatter_add (bincount would synchronize with the host on CUDA)."""
    flat = topk_idx.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat.clamp(min=0), (flat >= 0).to(torch.int64))


def host_ints(t: torch.Tensor) -> list[int]:
    """A small integer tensor as a Python list: on CUDA one non-blocking copy into pinned memory,
    then waiting on an event for just that copy (not on the whole device)."""
    if t.device.type != "cuda":
        return t.tolist()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return host.tolist()


# --------------------------------------------------------------------------- weight sharding

def shard_experts(experts: nn.Module, ep_rank: int, ep: int, etp_rank: int, etp: int) -> None:
    """Keep this rank's E/ep experts and its I/etp slice of their hidden dim, in place.

    w_gate_up [E, H, 2I] (gate | up): experts [e0, e1), gate[..., i0:i1] | up[..., i0:i1]
    w_down    [E, I, H]:              experts [e0, e1), rows [i0, i1)
    """
    E, H, two_i = experts.w_gate_up.shape
    inter = two_i // 2
    if E % ep:
        raise ValueError(f"num_experts ({E}) must be divisible by parallel.ep ({ep})")
    if inter % etp:
        raise ValueError(f"model.moe.expert_hidden ({inter}) must be divisible by parallel.etp ({etp})")
    el, il = E // ep, inter // etp
    e0, i0 = ep_rank * el, etp_rank * il
    with torch.no_grad():
        gu = experts.w_gate_up.detach()[e0:e0 + el]
        w_gate_up = torch.cat([gu[..., i0:i0 + il], gu[..., inter + i0:inter + i0 + il]], dim=-1).clone()
        w_down = experts.w_down.detach()[e0:e0 + el, i0:i0 + il].clone()
    experts.w_gate_up = nn.Parameter(w_gate_up)
    experts.w_down = nn.Parameter(w_down)
    experts.num_experts, experts.hidden = el, il
    set_spec(experts.w_gate_up, replica_group="edp", global_shape=(E, H, two_i),
             index=(((e0, e0 + el),), ((0, H),), ((i0, i0 + il), (inter + i0, inter + i0 + il))))
    set_spec(experts.w_down, replica_group="edp", global_shape=(E, inter, H),
             index=(((e0, e0 + el),), ((i0, i0 + il),), ((0, H),)))


__all__ = ["AllToAllDispatcher", "shard_experts"]
