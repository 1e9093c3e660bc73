"""Communication of one rank: bytes per collective kind, and which link carries them.

Bytes are counted as `benchmarks/ep_alltoall_bytes.py` counts them: what a rank *sends to other
ranks* (its own share stays local). Ring collectives of n ranks on a tensor of B bytes send
2(n-1)/n B (all-reduce) or (n-1)/n B (all-gather / reduce-scatter of the full tensor B).

Expert parallel (megamoe.parallel.expert, deduplicated dispatch): a token crosses the network
once per *remote EP rank* holding any of its experts ("pairs"). Routing is a model input; the
default, "balanced", is the uniform top-k: every K-subset of the E experts equally likely. Then
the expected number of EP ranks a token reaches is exact and rational:
    hit(E, K, ep)    = ep * (1 - C(E - E/ep, K) / C(E, K))
    remote(E, K, ep) = (ep - 1) * (1 - C(E - E/ep, K) / C(E, K))
A router that cycles through all C(E, K) subsets equally often realises it exactly (the
validation test does that). Per MoE layer and micro-batch, P = tokens * remote pairs:
    rows    fwd  P*H*(c + a)   dispatch in the compute dtype c, combine partials in the
                               accumulation dtype a (fp32 under bf16; see expert.py)
            bwd  P*H*(c + c)   both gradients travel in the compute dtype
    ids     fwd  P*K*(1 byte if E/ep <= 127 else 4)
    weights fwd + bwd  P*K*w   (routing weights, fp32 router: w = 4; 8 in fp64 mode)
    counts  fwd  (ep-1) * chunks * (E/ep + 1) * 8   (int64 split sizes)
Expert-TP adds all-gathers of the received pairs over etp and the reduce-scatter of partials.
Full recompute repeats every forward exchange; selective recompute repeats none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction
from math import comb

from megamoe.plan.constants import Constants


@functools.lru_cache(maxsize=1024)
def hit_ranks_per_token(num_experts: int, top_k: int, ep: int) -> Fraction:
    """Expected EP ranks (own included) holding >= 1 of a token's top-k experts, uniform routing."""
    local = num_experts // ep
    miss = Fraction(comb(num_experts - local, top_k), comb(num_experts, top_k))
    return ep * (1 - miss)


@functools.lru_cache(maxsize=1024)
def remote_ranks_per_token(num_experts: int, top_k: int, ep: int) -> Fraction:
    """The same, other EP ranks only: the (token, rank) pairs that cross the network."""
    local = num_experts // ep
    miss = Fraction(comb(num_experts - local, top_k), comb(num_experts, top_k))
    return (ep - 1) * (1 - miss)


@dataclass(frozen=True)
class EPBytes:
    """Bytes one rank sends per MoE layer per micro-batch (forward + backward of training)."""
    rows_fwd: int
    rows_bwd: int
    ids_fwd: int
    weights_fwd: int
    weights_bwd: int
    counts_fwd: int
    etp_fwd: int = 0
    etp_bwd: int = 0

    @property
    def total(self) -> int:
        return (self.rows_fwd + self.rows_bwd + self.ids_fwd + self.weights_fwd + self.weights_bwd
                + self.counts_fwd + self.etp_fwd + self.etp_bwd)

    @property
    def forward(self) -> int:
        return self.rows_fwd + self.ids_fwd + self.weights_fwd + self.counts_fwd + self.etp_fwd


def ep_bytes_per_layer(tokens: int, hidden: int, num_experts: int, top_k: int, ep: int, etp: int,
                       compute_bytes: int, accum_bytes: int, weight_bytes: int = 4,
                       chunks: int = 1) -> EPBytes:
    """`tokens`: tokens this rank's MoE block routes per micro-batch (micro_batch*seq/tp)."""
    if ep == 1 and etp == 1:
        return EPBytes(0, 0, 0, 0, 0, 0)
    el = num_experts // ep
    pairs = tokens * remote_ranks_per_token(num_experts, top_k, ep)          # sent off-rank
    received = tokens * hit_ranks_per_token(num_experts, top_k, ep)          # incl. own rank
    id_bytes = 1 if el <= 127 else 4
    counts = (ep - 1) * chunks * (el + 1) * 8
    etp_fwd = etp_bwd = 0
    if etp > 1:
        # counts over etp (int64 all-gather of [ep, chunks, El+1]), pair rows, ids and weights
        # gathered to every etp peer; partials reduce-scattered back.
        peers = received * (etp - 1)
        etp_fwd = int(peers * (hidden * (compute_bytes + accum_bytes) + top_k * (id_bytes + weight_bytes))) \
            + (etp - 1) * ep * chunks * (el + 1) * 8
        etp_bwd = int(peers * (hidden * 2 * compute_bytes + top_k * weight_bytes))
    return EPBytes(
        rows_fwd=int(pairs * hidden * (compute_bytes + accum_bytes)),
        rows_bwd=int(pairs * hidden * 2 * compute_bytes),
        ids_fwd=int(pairs * top_k * id_bytes),
        weights_fwd=int(pairs * top_k * weight_bytes),
        weights_bwd=int(pairs * top_k * weight_bytes),
        counts_fwd=counts if ep > 1 else 0, etp_fwd=etp_fwd, etp_bwd=etp_bwd)


def ring_bytes(kind: str, nbytes: float, n: int) -> float:
    """Bytes one rank sends in a ring collective over n ranks on a (full) tensor of nbytes."""
    if n <= 1:
        return 0.0
    return (2 if kind == "all_reduce" else 1) * (n - 1) / n * nbytes


@dataclass(frozen=True)
class Link:
    """Where a group's traffic goes: all inside one node, or spread over `nodes` nodes."""
    size: int
    nodes: int

    @property
    def intra(self) -> bool:
        return self.nodes <= 1

    def inter_fraction(self) -> float:
        """Share of an all-to-all's peers on other nodes."""
        if self.size <= 1 or self.nodes <= 1:
            return 0.0
        per_node = self.size / self.nodes
        return (self.size - per_node) / (self.size - 1)


def group_link(stride: int, size: int, gpus_per_node: int) -> Link:
    """A group of `size` ranks `stride` apart (megamoe.parallel.mesh's rank order: tp fastest,
    then dp, then pp; the expert view: etp, then ep, then edp inside a stage)."""
    span = stride * size
    if size <= 1 or (span <= gpus_per_node and gpus_per_node % span == 0):
        return Link(size, 1)
    return Link(size, max(2, min(size, span // gpus_per_node)))


def ring_time(nbytes_sent: float, calls: int, link: Link, c: Constants) -> float:
    if nbytes_sent <= 0 or link.size <= 1:
        return 0.0
    e, hw = c.efficiency, c.hardware
    if link.intra:
        return nbytes_sent / (hw.intra_node_bytes_per_s * e.ring_intra) + calls * e.latency_intra_s
    return nbytes_sent / (hw.inter_node_bytes_per_s * e.ring_inter) + calls * e.latency_inter_s


def alltoall_time(nbytes_sent: float, calls: int, link: Link, c: Constants) -> float:
    if nbytes_sent <= 0 or link.size <= 1:
        return 0.0
    e, hw = c.efficiency, c.hardware
    inter = link.inter_fraction()
    t_intra = nbytes_sent * (1 - inter) / (hw.intra_node_bytes_per_s * e.alltoall_intra)
    t_inter = nbytes_sent * inter / (hw.inter_node_bytes_per_s * e.alltoall_inter)
    lat = e.latency_intra_s if link.intra else e.latency_inter_s
    return max(t_intra, t_inter) + calls * lat


__all__ = ["hit_ranks_per_token", "remote_ranks_per_token", "EPBytes", "ep_bytes_per_layer",
           "ring_bytes", "Link", "group_link", "ring_time", "alltoall_time"]
