"""ZeRO-1: the distributed AdamW of megamoe's data parallelism.

Parameters and gradients live in flat buffers (p.data / p.grad are views), one pair per bucket:
a run of at most bucket_numel elements of parameters that share a shard group ("dp", or
"edp" for experts) and a weight-decay setting, in backward order (the layout of Megatron's
distributed optimizer). Each rank owns a contiguous 1/n slice of every bucket and keeps the
fp32 master copy and AdamW moments of that slice only.
  backward  a bucket's gradients are reduce-scattered (async) as soon as they are final in the
            step's last backward (data.BucketLauncher), overlapping the rest of the backward;
            buckets whose gradients still change after backward are deferred to
            reduce_grads(): the tied embedding (summed across pipeline stages first) and, under
            TP, the parameters with TP-partial gradients (summed over TP first: no TP
            collective runs inside a backward hook)
  step      the owned slices are stepped with torch AdamW (the single-process per-element math)
  publish   the parameters are all-gathered back in chunks of at most bucket_numel elements, a
            few in flight
Legend: n the bucket's shard-group size; shard_numel = padded bucket size / n.
"""

from __future__ import annotations

import collections
import math

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.autograd.graph import increment_version

from megamoe.parallel import collectives as C
from megamoe.parallel.data import (DEFAULT_BUCKET_NUMEL, LATE_GRAD_ATTR, BucketedReduction, BucketLauncher,
                                   global_norm, split_buckets)
from megamoe.parallel.guard import guarded
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.params import get_spec
from megamoe.precision import accum_dtype, upcast
from megamoe.training.optim import param_groups

GATHER_IN_FLIGHT = 2             # parameter all-gathers outstanding at once


def _tp_partial(p, mesh: ParallelMesh) -> bool:
    """p's gradient is a per-TP-rank partial sum, to be summed over TP before the reduce-scatter."""
    return get_spec(p).reduce_group == "dp_tp" and mesh.tp > 1


class _Bucket:
    """Flat param / grad buffers of params sharing a shard group and a weight-decay setting;
    deferred: reduced only in reduce_grads (see the module docstring)."""

    def __init__(self, named_params, group_name: str, decay: bool, deferred: bool, mesh: ParallelMesh):
        self.group_name, self.decay, self.deferred, self.mesh = group_name, decay, deferred, mesh
        self.work = self.out = None
        self.group, self.size, self.rank = mesh.group(group_name), mesh.size(group_name), mesh.rank_in(group_name)
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        dtype, device = self.params[0].dtype, self.params[0].device
        assert all(p.dtype == dtype and p.device == device for p in self.params), "mixed dtypes in a bucket"
        total = sum(p.numel() for p in self.params)
        padded = math.ceil(total / self.size) * self.size
        self.shard_numel = padded // self.size
        self.lo, self.hi = self.rank * self.shard_numel, (self.rank + 1) * self.shard_numel
        self.param_buf = torch.zeros(padded, dtype=dtype, device=device)
        self.grad_buf = torch.zeros(padded, dtype=dtype, device=device)
        self.offsets, offset = [], 0
        with torch.no_grad():
            for p in self.params:
                self.param_buf[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
                p.data = self.param_buf[offset:offset + p.numel()].view_as(p)
                self.offsets.append(offset)
                offset += p.numel()
        # fp32 master copy of this rank's slice (the optimizer steps this, not the model params).
        # Params already in the accumulation dtype (fp32 params under bf16 autocast, megamoe's
        # default) are their own masters: the master IS the slice of the flat buffer, so AdamW
        # steps the params in place and no second fp32 copy is kept.
        own = self.param_buf[self.lo:self.hi].detach()
        self.own_master = upcast(own) is own
        self.master = torch.nn.Parameter(own if self.own_master else upcast(own).clone())
        self.tp_partial = [i for i, p in enumerate(self.params) if _tp_partial(p, mesh)]
        # Elements of full TP copies count in the norm on TP rank 0 only; duplicates never.
        tp_copies_masked = mesh.tp > 1 and mesh.coords.tp != 0 and group_name == "dp"
        uncounted = [(p, o) for p, o in zip(self.params, self.offsets)
                     if not get_spec(p).norm_counted
                     or (tp_copies_masked and get_spec(p).replica_group == "dp_tp")]
        self.norm_mask = None
        if uncounted:
            mask = torch.ones(padded, dtype=accum_dtype(dtype), device=device)
            for p, o in uncounted:
                mask[o:o + p.numel()] = 0.0
            self.norm_mask = mask[self.lo:self.hi].clone()

    def grad_view(self, i: int) -> torch.Tensor:
        p, o = self.params[i], self.offsets[i]
        return self.grad_buf[o:o + p.numel()].view_as(p)

    def attach_grads(self) -> None:
        self.grad_buf.zero_()
        for i, p in enumerate(self.params):
            p.grad = self.grad_view(i)

    def collect_grads(self) -> None:
        """Make sure the buffer holds every gradient (autograd accumulates into the views in
        place; a gradient replaced by someone else is copied back in)."""
        for i, p in enumerate(self.params):
            view = self.grad_view(i)
            if p.grad is None:
                view.zero_()
                p.grad = view
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)
                p.grad = view

    def launch(self) -> None:
        """Start reducing this bucket's gradients: (sum TP-partial ones over TP,) then an async
        reduce-scatter over the shard group into this rank's slice."""
        self.collect_grads()
        if self.tp_partial:
            views = [self.grad_view(i) for i in self.tp_partial]
            flat = C.all_reduce_(_flatten_dense_tensors(views), self.mesh.group("tp"))
            for v, g in zip(views, _unflatten_dense_tensors(flat, views)):
                v.copy_(g)
        if self.size > 1:
            self.out = torch.empty(self.shard_numel, dtype=self.grad_buf.dtype, device=self.grad_buf.device)
            with guarded(self.group):
                self.work = C._reduce_scatter_flat(self.out, self.grad_buf, group=self.group, async_op=True)

    def finish(self, dp: int) -> None:
        """Wait for the reduce-scatter; this rank's slice = the group's sum / dp."""
        shard = self.grad_buf[self.lo:self.hi]
        if self.work is not None:
            with guarded(self.group):
                self.work.wait()
            shard.copy_(self.out)
        shard.div_(dp)
        self.work = self.out = None

    def layout(self) -> dict:
        return {"group": self.group_name, "decay": self.decay, "shard": [self.lo, self.hi],
                "numel": self.param_buf.numel(),
                "params": [{"name": n, "offset": o, "shape": list(p.shape), "spec": get_spec(p).to_dict()}
                           for n, p, o in zip(self.names, self.params, self.offsets)]}


class ZeroOptimizer(BucketedReduction):
    """ZeRO-1 AdamW. Same interface as the torch optimizer the trainer uses (param_groups,
    zero_grad, step, state_dict, load_state_dict) plus no_sync() / reduce_grads() / grad_norm().
    zero_grad always zeroes the flat gradient buffers (set_to_none is ignored: the views must
    stay). overlap=False: every reduce-scatter runs in reduce_grads."""

    def __init__(self, model: torch.nn.Module, optim_cfg, mesh: ParallelMesh,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, overlap: bool = True):
        self.mesh, self.bucket_numel = mesh, bucket_numel
        decay_ids = {id(p) for p in param_groups(model, optim_cfg.weight_decay)[0]["params"]}
        # Reverse order: backward finishes the last layers first.
        order = list(reversed([(n, p) for n, p in model.named_parameters() if p.requires_grad]))

        def key(p):
            group = "edp" if get_spec(p).replica_group == "edp" else "dp"
            deferred = bool(getattr(p, LATE_GRAD_ATTR, False)) or _tp_partial(p, mesh)
            return group, id(p) in decay_ids, deferred

        buckets = []
        for group_name in ("dp", "edp"):                       # the same order on every rank
            for decay in (True, False):
                for deferred in (False, True):
                    chosen = [(n, p) for n, p in order if key(p) == (group_name, decay, deferred)]
                    for run in split_buckets(chosen, bucket_numel, numel=lambda named: named[1].numel()):
                        buckets.append(_Bucket(run, group_name, decay, deferred, mesh))
        self.launcher = BucketLauncher(buckets, [p for _, p in order], overlap)
        self.buckets: list[_Bucket] = self.launcher.buckets
        groups = [{"params": [b.master for b in self.buckets if b.decay], "weight_decay": optim_cfg.weight_decay},
                  {"params": [b.master for b in self.buckets if not b.decay], "weight_decay": 0.0}]
        self.inner = torch.optim.AdamW([g for g in groups if g["params"]], lr=optim_cfg.lr,
                                       betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)
        for b in self.buckets:
            b.attach_grads()

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for b in self.buckets:
            b.attach_grads()

    def grad_norm(self) -> torch.Tensor:
        device = self.buckets[0].grad_buf.device if self.buckets else torch.device("cpu")
        dtype = self.buckets[0].master.dtype if self.buckets else torch.float32
        sq = torch.zeros((), dtype=dtype, device=device)
        for b in self.buckets:
            g = upcast(b.grad_buf[b.lo:b.hi])
            sq += (g * g).sum() if b.norm_mask is None else (g * g * b.norm_mask).sum()
        return global_norm(sq)

    @torch.no_grad()
    def step(self) -> None:
        for b in self.buckets:
            b.master.grad = upcast(b.grad_buf[b.lo:b.hi])
        self.inner.step()
        self._publish(self.buckets)

    def _publish(self, buckets: list[_Bucket]) -> None:
        """Copy each stepped master slice into the params and all-gather every rank's slice.

        In chunks: each collective gathers at most bucket_numel elements (a piece of every
        rank's slice, into a temporary buffer), GATHER_IN_FLIGHT of them outstanding, so the
        temporary memory is bounded and the copies out of one chunk overlap the transfer of
        the next. Every rank walks the same buckets and chunks in the same order."""
        in_flight = collections.deque()
        for b in buckets:
            if not b.own_master:
                b.param_buf[b.lo:b.hi].copy_(b.master.detach())
            if b.size == 1:
                continue
            step = max(1, self.bucket_numel // b.size)
            for start in range(0, b.shard_numel, step):
                n = min(step, b.shard_numel - start)
                if len(in_flight) == GATHER_IN_FLIGHT:
                    self._place_gathered(*in_flight.popleft())
                out = torch.empty(b.size * n, dtype=b.param_buf.dtype, device=b.param_buf.device)
                # The input is this rank's own range, which nothing writes until the end.
                with guarded(b.group):
                    work = C._all_gather_flat(out, b.param_buf[b.lo + start:b.lo + start + n],
                                              group=b.group, async_op=True)
                in_flight.append((b, start, n, out, work))
        while in_flight:
            self._place_gathered(*in_flight.popleft())
        # The params changed through the flat buffers, which their version counters do not
        # see: tell autograd (and what keys on it, e.g. the experts' cached bf16 weights).
        for b in buckets:
            for p in b.params:
                increment_version(p)

    @staticmethod
    def _place_gathered(b: _Bucket, start: int, n: int, out: torch.Tensor, work) -> None:
        with guarded(b.group):
            work.wait()
        for r in range(b.size):
            if r != b.rank:
                o = r * b.shard_numel + start
                b.param_buf[o:o + n].copy_(out[r * n:(r + 1) * n])

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(),
                "masters": [b.master.detach().clone() for b in self.buckets],
                "layout": [b.layout() for b in self.buckets]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if [(l["group"], l["decay"], l["shard"], l["numel"]) for l in state["layout"]] != \
                [(l["group"], l["decay"], l["shard"], l["numel"]) for l in (b.layout() for b in self.buckets)]:
            raise ValueError("the checkpoint's ZeRO-1 shards do not match this run's layout; "
                             "use megamoe.checkpoint.sharded to load it into another layout")
        self.inner.load_state_dict(state["inner"])
        for b, master in zip(self.buckets, state["masters"]):
            b.master.copy_(master)
        self._publish(self.buckets)

    def param_state_pieces(self) -> dict[str, dict]:
        """This rank's share of the AdamW state, per parameter name (layout-independent form for
        megamoe.checkpoint.sharded): {name: {"flat": [a, b], "step", "exp_avg",
        "exp_avg_sq"[, "master"]}}, [a, b) being the range of the flattened local parameter that
        this rank's slice of the flat buffer covers. Masters only when the params are not fp32
        (otherwise they equal the params). Empty before the first step."""
        out = {}
        for b in self.buckets:
            st = self.inner.state.get(b.master, {})
            if "exp_avg" not in st:
                continue
            with_master = not b.own_master
            for name, p, o in zip(b.names, b.params, b.offsets):
                lo, hi = max(b.lo, o), min(b.hi, o + p.numel())
                if lo >= hi:
                    continue
                part = slice(lo - b.lo, hi - b.lo)
                # clone: torch.save of a view would write the whole flat buffer
                piece = {"flat": [lo - o, hi - o], "step": float(st["step"]),
                         "exp_avg": st["exp_avg"][part].clone(), "exp_avg_sq": st["exp_avg_sq"][part].clone()}
                if with_master:
                    piece["master"] = b.master.detach()[part].clone()
                out[name] = piece
        return out

    @torch.no_grad()
    def load_param_state(self, fetch) -> None:
        """Inverse of param_state_pieces, from any layout: fetch(name, param) returns that local
        parameter's {"step", "exp_avg", "exp_avg_sq"[, "master"]} (tensors shaped like it) or
        None (no state saved). Call after the weights are loaded: masters not given are taken
        from the params. Collective over each bucket's group (the params are re-published)."""
        for b in self.buckets:
            master = upcast(b.param_buf[b.lo:b.hi])
            moments = {k: torch.zeros_like(master) for k in ("exp_avg", "exp_avg_sq")}
            steps = []
            for name, p, o in zip(b.names, b.params, b.offsets):
                lo, hi = max(b.lo, o), min(b.hi, o + p.numel())
                if lo >= hi:
                    continue
                st = fetch(name, p)
                if st is None:
                    continue
                steps.append(float(st["step"]))
                dst, src = slice(lo - b.lo, hi - b.lo), slice(lo - o, hi - o)
                for key, buf in moments.items():
                    buf[dst] = st[key].reshape(-1)[src].to(buf.dtype)
                if st.get("master") is not None:
                    master[dst] = st["master"].reshape(-1)[src].to(master.dtype)
            b.master.copy_(master)
            if steps:
                self.inner.state[b.master] = {"step": torch.tensor(max(steps)), **moments}
            else:
                self.inner.state.pop(b.master, None)
        self._publish(self.buckets)


__all__ = ["ZeroOptimizer", "GATHER_IN_FLIGHT"]
