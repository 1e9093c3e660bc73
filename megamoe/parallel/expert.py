"""Expert parallelism: the all-to-all token dispatcher and expert-weight sharding.

Legend: T local tokens, K top-k, H hidden, E experts in total, El = E/ep experts on this rank,
I expert hidden, Il = I/etp its slice under expert-TP, N rows (token copies, one per expert),
P pairs (token, destination EP rank) with at least one of the token's experts on that rank.

AllToAllDispatcher has LocalDispatcher's API (megamoe.moe.dispatch): exchanges are started and
later waited for, so that the caller computes while they travel.
  dispatch_start(x[T, H], topk_idx[T, K], num_valid=None) -> [flight per token chunk]
      flight.wait() -> x_local[N_in, H] expert-major over this rank's El experts, counts_local[El], ctx
  combine_start(y_local[N_in, H], topk_weight[T, K], ctx) -> flight; flight.wait() -> y[T_chunk, H]
  dispatch(...) / combine(...): the same in one chunk, waited for at once.

Overlap (dedup path). MoELayer computes the shared experts while the dispatch exchange is in
flight. With chunks = 2 (parallel.ep_overlap_chunks) the layer's tokens are split in two halves
after routing; both halves' counts travel in one exchange (still one host transfer per layer),
both dispatches start at once, and
    experts(chunk 0)  runs while  chunk 1's rows travel
    experts(chunk 1)  runs while  chunk 0's results travel back
In backward the reverse exchanges are asynchronous too (collectives.all_to_all_async): a
chunk's gradient exchange travels while the other chunk's expert GEMMs run backward. Results
equal one chunk up to the order of floating-point sums over the expert weights' gradients
(each half's rows are summed separately, then added).

Deduplicated dispatch (dedup=True, the default): a token crosses the network ONCE per EP rank
that holds any of its experts, not once per expert.
  dispatch
  1. per destination rank: the token-slots per expert and the number of (token, rank) pairs,
     [ep, El+1] int64; the exchange of these counts starts (async all_to_all_single)
  2. while they travel: the pairs, rank-major and in token order inside a rank (a stable sort
     of the [T, ep] pair matrix, ops.sort_by_expert with the ranks as "experts"), and for each
     pair the token's K local expert ids on that rank (-1: the slot is elsewhere or dropped)
  3. ONE device-to-host transfer of all split sizes (the only host sync of the layer's
     forward; backward reuses them)
  4. exchange the pair rows and their K local ids (same split sizes; ids int8 or int32)
  5. expert-TP: all-gather rows and ids over the etp group
  6. the receiving rank expands each pair into its local experts: ops.permute of the received
     rows with the received ids, expert-major and stable (inside an expert: etp peer, source
     rank, token order -- the same rows in the same order as the per-expert path, so the
     expert GEMMs see identical inputs)
  combine
  1. the routing weights of each pair (the token's K weights) travel to the receiving rank
     (differentiable all-to-all; over etp the same all-gather)
  2. the receiving rank reduces: y_pair = sum over the token's local experts of weight * y
     (ops.unpermute with the received ids; slots not on this rank contribute nothing), in the
     accumulation dtype: under bf16/fp16 the partials travel in fp32 (combine forward only;
     their gradients are exactly compute-dtype values and travel in it), so the output is
     rounded once, as in one process (low_precision_partials=True: partials in the compute
     dtype, half those bytes, one more rounding per (token, rank), as DeepEP's combine)
  3. expert-TP: the partial y_pair of the etp ranks (each over its Il slice) are summed and
     scattered back (the weighted sum is linear, so it commutes with the etp sum)
  4. one row per pair goes back; the source sums its pairs per token (ops.unpermute, weight 1)
     and rounds to the compute dtype
  Backward is the transposed chain: the gradient of a routing weight is computed on the rank
  that holds the expert output (a dot product inside ops.unpermute's backward), travels back
  through the weights' all-to-all and is scattered into topk_weight's gradient (the other
  ranks' copies of that weight get exactly zero), so it is the same dot product as before.
  Results equal the per-expert path up to the order of floating-point sums (a token's K
  weighted outputs are summed per rank first, then over ranks; the input gradient likewise).

Per-expert dispatch (dedup=False, kept as the reference): a token is sent once per selected
expert.
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
from megamoe.moe.dispatch import Done, expert_counts
from megamoe.parallel import collectives as C
from megamoe.parallel.guard import guarded
from megamoe.parallel.params import set_spec
from megamoe.precision import accum_dtype


@dataclass
class _DispatchCtx:
    perm_map: torch.Tensor       # local permutation (ops.permute)
    order: torch.Tensor          # received (block-major) row -> expert-major position
    send_splits: list[int]       # rows to each EP rank
    recv_splits: list[int]       # rows from each EP rank
    etp_splits: list[int]        # rows each etp peer contributed to the gathered buffer


@dataclass
class _DedupCtx:
    tokens: slice                # this chunk's tokens of the layer's [T]
    pair_map: torch.Tensor       # [P] pair t*ep + r of each sent row (rank-major, token order)
    send_splits: list[int]       # pairs to each EP rank
    recv_splits: list[int]       # pairs from each EP rank
    etp_splits: list[int]        # pairs each etp peer contributed to the gathered buffer
    num_rows: int                # expanded rows this rank's experts receive
    recv_map: torch.Tensor | None = None   # [N_in] received slot p*K + k of each expert-major row

    @property
    def num_tokens(self) -> int:
        return self.tokens.stop - self.tokens.start


class AllToAllDispatcher:
    def __init__(self, num_experts: int, ep_group, etp_group=None, dedup: bool = True,
                 low_precision_partials: bool = False, chunks: int = 1):
        self.num_experts = num_experts
        self.ep_group, self.etp_group = ep_group, etp_group
        self.ep = C.group_size(ep_group)
        self.etp = C.group_size(etp_group) if etp_group is not None else 1
        if num_experts % self.ep:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep ({self.ep})")
        self.num_local = num_experts // self.ep
        # True: one copy of a token per destination EP rank; False: one per expert (reference).
        self.dedup = dedup
        # Dedup under a 16-bit compute dtype: the per-(token, rank) partial sums travel in fp32
        # (False: one rounding per token, as in one process) or in the compute dtype (True: half
        # the combine-forward bytes, one extra rounding per partial, as DeepEP's combine).
        self.low_precision_partials = low_precision_partials
        # Token chunks per layer call (dedup path): chunk i+1's exchange overlaps chunk i's
        # expert GEMMs (parallel.ep_overlap_chunks). 1: one exchange, overlapped only with the
        # shared experts.
        self.chunks = chunks
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

    def _exchange_counts(self, counts: torch.Tensor):
        """Start the all-to-all of the equal-sized count blocks: -> (recv buffer, work or None)."""
        recv, work = torch.empty_like(counts), None
        if self.ep > 1:
            with guarded(self.ep_group):
                work = dist.all_to_all_single(recv, counts, group=self.ep_group, async_op=True)
        else:
            recv.copy_(counts)
        return recv, work

    def _wait(self, work) -> None:
        if work is not None:
            with guarded(self.ep_group):
                work.wait()

    def _etp_gather(self, t: torch.Tensor, etp_splits: list[int], key: str) -> torch.Tensor:
        """All-gather of unequal sizes over etp = all-to-all sending the same rows to every peer;
        its backward sums the gradients of the copies (the reduce-scatter we need)."""
        mine = t.shape[0]
        return C.all_to_all(t.repeat(self.etp, 1), self.etp_group, [mine] * self.etp, etp_splits,
                            self._counter(key, self.etp_group))

    def _etp_reduce_scatter(self, t: torch.Tensor, etp_splits: list[int], grad_dtype=None) -> torch.Tensor:
        """Each peer's block gets this rank's partial sums over its Il slice; sum the partials."""
        mine = etp_splits[C.group_rank(self.etp_group)]
        parts = C.all_to_all_grad_as(t, self.etp_group, etp_splits, [mine] * self.etp,
                                     grad_dtype or t.dtype, self._counter("etp_reduce_scatter", self.etp_group))
        return parts.view(self.etp, mine, -1).sum(0)

    # ------------------------------------------------------------------------------ dispatch
    def dispatch_start(self, x: torch.Tensor, topk_idx: torch.Tensor, num_valid: int | None = None,
                       chunks: int | None = None) -> list:
        """Start sending x[T, H] (routed by topk_idx[T, K]) in `chunks` token chunks (default
        self.chunks): -> one flight per chunk, whose wait() gives (x_local[N_in, H] expert-major,
        counts_local[El], ctx). num_valid (valid slots, when the caller knows them) spares the
        per-expert path's local permutation a host sync. The per-expert reference path sends one
        chunk, synchronously."""
        if self.dedup:
            return self._dispatch_dedup_start(x, topk_idx, chunks or self.chunks)
        return [Done(self._dispatch_per_expert(x, topk_idx, num_valid))]

    def combine_start(self, y_local: torch.Tensor, topk_weight: torch.Tensor, ctx):
        """Start sending a chunk's expert outputs back: -> a flight whose wait() gives the
        chunk's y[T_chunk, H] (topk_weight[T, K] is the whole layer's)."""
        if isinstance(ctx, _DedupCtx):
            return self._combine_dedup_start(y_local, topk_weight, ctx)
        return Done(self._combine_per_expert(y_local, topk_weight, ctx))

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_valid: int | None = None):
        """x[T, H], topk_idx[T, K] -> (x_local[N_in, H] expert-major, counts_local[El], ctx), in
        one chunk, waited for."""
        return self.dispatch_start(x, topk_idx, num_valid, chunks=1)[0].wait()

    def combine(self, y_local: torch.Tensor, topk_weight: torch.Tensor, ctx) -> torch.Tensor:
        return self.combine_start(y_local, topk_weight, ctx).wait()

    # ------------------------------------------------------------- deduplicated (token, rank)
    def _dispatch_dedup_start(self, x: torch.Tensor, topk_idx: torch.Tensor, chunks: int) -> list:
        ep, el = self.ep, self.num_local
        T = topk_idx.shape[0]
        topk_idx = topk_idx.long()
        bounds = chunk_bounds(T, chunks)
        nc = len(bounds)
        # 1. per chunk, slots per (token, rank) -> pairs; counts per rank: [ep, El] slots + [ep]
        #    pairs. Every chunk's counts travel in ONE exchange: [ep, nc, El+1]
        has_pair, counts = [], []
        for t in bounds:
            idx = topk_idx[t]
            valid = idx >= 0
            dest = torch.where(valid, idx // el, -1)                                  # [Tc, K] EP rank
            per_pair = torch.zeros((idx.shape[0], ep), dtype=torch.int64, device=x.device)
            per_pair.scatter_add_(1, dest.clamp(min=0), valid.to(torch.int64))
            has_pair.append(per_pair > 0)                                              # [Tc, ep]
            counts.append(torch.cat([expert_counts(idx, self.num_experts).view(ep, el),
                                     has_pair[-1].sum(0, dtype=torch.int64).view(ep, 1)], dim=1))
        counts = torch.stack(counts, dim=1)                                            # [ep, nc, El+1]
        recv_counts, work = self._exchange_counts(counts.flatten())
        # 2. while the counts travel: each chunk's pairs, rank-major, token order inside a rank
        ranks = torch.arange(ep, device=x.device)
        pair_maps = [ops.sort_by_expert(torch.where(hp, ranks, -1), ep)[0] for hp in has_pair]
        self._wait(work)
        recv_counts = recv_counts.view(ep, nc, el + 1)                 # what I receive, per source
        block = recv_counts
        if self.etp > 1:   # every etp peer's received blocks: [etp*ep, nc, El+1]
            gathered = block.new_empty((self.etp * ep, nc, el + 1))
            C.all_gather_flat(gathered, block.contiguous(), self.etp_group)
            block = gathered
        # 3. the layer's one device-to-host transfer, for every chunk: pairs to / from each EP
        #    rank, pairs per etp peer, expanded rows. Backward reuses them: no transfer there.
        splits = host_ints(torch.cat([
            counts[:, :, el].t().flatten(),                                           # [nc, ep]
            recv_counts[:, :, el].t().flatten(),                                      # [nc, ep]
            block[:, :, el].view(self.etp, ep, nc).sum(1).t().flatten(),              # [nc, etp]
            block[:, :, :el].sum(dim=(0, 2))]))                                       # [nc]
        sends, splits = splits[:nc * ep], splits[nc * ep:]
        recvs, splits = splits[:nc * ep], splits[nc * ep:]
        etps, rows = splits[:nc * self.etp], splits[nc * self.etp:]
        # 4. per chunk, one row per pair with its K local expert ids (-1: the slot is on another
        #    rank or dropped); every chunk's exchange starts now
        flights = []
        for c, t in enumerate(bounds):
            send_splits = sends[c * ep:(c + 1) * ep]
            ctx = _DedupCtx(t, pair_maps[c][:sum(send_splits)], send_splits, recvs[c * ep:(c + 1) * ep],
                            etps[c * self.etp:(c + 1) * self.etp], rows[c])
            token = ctx.pair_map // ep
            rank = ctx.pair_map - token * ep
            ids = topk_idx[t].index_select(0, token)                                   # [P, K]
            mine = (ids >= 0) & (ids // el == rank.unsqueeze(1))
            ids = torch.where(mine, ids - (rank * el).unsqueeze(1), -1).to(self._id_dtype())
            x_pairs = ops.permute_with_map(x[t], ctx.pair_map, ep)                     # [P, H]
            flights.append(_DedupDispatch(self, ctx, C.all_to_all_async(
                x_pairs, self.ep_group, ctx.send_splits, ctx.recv_splits,
                self._counter("dispatch", self.ep_group)), C.all_to_all_async(
                ids, self.ep_group, ctx.send_splits, ctx.recv_splits,
                self._counter("dispatch_ids", self.ep_group))))
        return flights

    def _dispatch_dedup_finish(self, ctx: _DedupCtx, x_recv: torch.Tensor, ids_recv: torch.Tensor):
        # 5. expert-TP: every etp rank needs every pair of its experts
        if self.etp > 1:
            x_recv = self._etp_gather(x_recv, ctx.etp_splits, "etp_gather")
            ids_recv = self._etp_gather(ids_recv, ctx.etp_splits, "etp_gather_ids")
        # 6. expand to the local experts, expert-major (stable: etp peer, source, token order)
        x_local, ctx.recv_map, counts_local = ops.permute(x_recv, ids_recv.long(), self.num_local,
                                                          ctx.num_rows)
        return x_local, counts_local, ctx

    def _combine_dedup_start(self, y_local: torch.Tensor, topk_weight: torch.Tensor, ctx: _DedupCtx):
        ep = self.ep
        # 1. the routing weights travel with the pairs (their gradients come back the same way)
        w_pairs = ops.permute_with_map(topk_weight[ctx.tokens], ctx.pair_map, ep)     # [P, K]
        w_recv = C.all_to_all(w_pairs, self.ep_group, ctx.send_splits, ctx.recv_splits,
                              self._counter("combine_weights", self.ep_group))
        if self.etp > 1:
            w_recv = self._etp_gather(w_recv, ctx.etp_splits, "etp_gather_weights")
        # 2. reduce on the receiving side: weighted sum over each pair's local experts, in the
        #    accumulation dtype under a 16-bit compute dtype (a partial rounded to bf16 would add
        #    a rounding the one-process sum does not have); its gradient is the compute dtype's
        dtype = y_local.dtype
        wide = dtype if self.low_precision_partials else accum_dtype(dtype)
        y_pairs = ops.unpermute(y_local.to(wide), ctx.recv_map, w_recv)                # [P_in, H]
        # 3. expert-TP: sum the partial results of the etp ranks
        if self.etp > 1:
            y_pairs = self._etp_reduce_scatter(y_pairs, ctx.etp_splits, dtype)
        # 4. one row per pair back (gradients in the compute dtype: they are its values exactly)
        return _DedupCombine(ctx, dtype, C.all_to_all_async(
            y_pairs, self.ep_group, ctx.recv_splits, ctx.send_splits,
            self._counter("combine", self.ep_group), grad_dtype=dtype))

    def _id_dtype(self) -> torch.dtype:
        """Local expert ids on the wire: one byte when they fit (-1 = not on that rank); NCCL
        has no int16."""
        return torch.int8 if self.num_local <= 127 else torch.int32

    # --------------------------------------------------------------- per-expert (reference)
    def _dispatch_per_expert(self, x: torch.Tensor, topk_idx: torch.Tensor, num_valid: int | None = None):
        # 1. per-expert counts, and their exchange started before the permutation it overlaps
        counts = expert_counts(topk_idx, self.num_experts)                   # [E] int64
        recv_counts, work = self._exchange_counts(counts)
        # 2. local permutation (rows for EP rank j contiguous) while the counts travel
        x_perm, perm_map, _ = ops.permute(x, topk_idx, self.num_experts, num_valid)  # [N, H]
        self._wait(work)
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
            x_recv = self._etp_gather(x_recv, etp_splits, "etp_gather")
        # 5. block-major (source, expert) -> expert-major
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_local, device=x.device).repeat(block_counts.shape[0]),
            block_counts.flatten().to(x.device), output_size=x_recv.shape[0])  # size known: no sync
        order = torch.argsort(expert_of_row, stable=True)
        x_local = x_recv.index_select(0, order)
        counts_local = block_counts.sum(0).to(counts.device)
        return x_local, counts_local, _DispatchCtx(perm_map, order, send_splits, recv_splits, etp_splits)

    def _combine_per_expert(self, y_local: torch.Tensor, topk_weight: torch.Tensor, ctx: _DispatchCtx) -> torch.Tensor:
        inverse = torch.empty_like(ctx.order)
        inverse[ctx.order] = torch.arange(ctx.order.numel(), device=ctx.order.device)
        y_recv = y_local.index_select(0, inverse)                     # back to block-major
        if self.etp > 1:
            y_recv = self._etp_reduce_scatter(y_recv, ctx.etp_splits)
        y_perm = C.all_to_all(y_recv, self.ep_group, ctx.recv_splits, ctx.send_splits,
                              self._counter("combine", self.ep_group))
        return ops.unpermute(y_perm, ctx.perm_map, topk_weight)


# ----------------------------------------------------------------------------- helpers

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


def chunk_bounds(num_tokens: int, chunks: int) -> list[slice]:
    """`chunks` contiguous token ranges of near-equal size (fewer when there are fewer tokens;
    one empty range for no tokens)."""
    n = max(1, min(chunks, num_tokens))
    edges = [num_tokens * i // n for i in range(n + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


class _DedupDispatch:
    """A chunk's rows and ids in flight; wait() expands them to the local experts."""

    def __init__(self, dispatcher: AllToAllDispatcher, ctx: _DedupCtx, rows, ids):
        self.dispatcher, self.ctx, self.rows, self.ids = dispatcher, ctx, rows, ids

    def wait(self):
        return self.dispatcher._dispatch_dedup_finish(self.ctx, self.rows.wait(), self.ids.wait())


class _DedupCombine:
    """A chunk's per-pair results on their way back; wait() sums each token's pairs and rounds
    once to the compute dtype."""

    def __init__(self, ctx: _DedupCtx, dtype: torch.dtype, back):
        self.ctx, self.dtype, self.back = ctx, dtype, back

    def wait(self) -> torch.Tensor:
        y_back = self.back.wait()
        ones = torch.ones((self.ctx.num_tokens, len(self.ctx.send_splits)), dtype=y_back.dtype,
                          device=y_back.device)
        return ops.unpermute(y_back, self.ctx.pair_map, ones).to(self.dtype)


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
