"""Data parallelism: gradient reduction, global gradient norm, ZeRO-1 distributed optimizer.

Rule (from each parameter's ParamSpec, see params.py): sum the gradient over its reduce group
("dp", "dp_tp" or "edp") and divide by dp. Each DP rank's loss is the mean over its own
micro-batches, so the average over DP ranks is the single-process gradient; TP-partial and
expert gradients are sums of per-rank token shares, hence a sum over the larger group but
still a division by dp only.

GradReducer     plain DP: flattens gradients into buckets (one reduce group per bucket) and
                all-reduces them asynchronously, overlapped with the step's last backward: a
                bucket starts as soon as all its gradients are final (see GradReducer); the
                optimizer is an ordinary torch AdamW on the local shards.
ZeroOptimizer   ZeRO-1: parameters and gradients live in flat buffers (p.data / p.grad are
                views); each rank owns a contiguous 1/n slice of every buffer and keeps the fp32
                master copy and AdamW moments of that slice only. Gradients are reduce-scattered
                after backward (not overlapped: the reduce-scatter must cover a whole buffer
                to keep the contiguous 1/n ownership), the slice is stepped with torch AdamW
                (same per-element math as the single-process optimizer), and the parameters are
                all-gathered back in chunks of at most bucket_numel elements, a few in flight.
Both expose no_sync(params, last), reduce_grads() and grad_norm() for ParallelContext. The norm
counts every global element once: TP shards each once, TP copies on TP rank 0 only, DP /
expert-DP replicas once.
"""

from __future__ import annotations

import collections
import contextlib
import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.autograd.graph import increment_version

from megamoe.parallel import collectives as C
from megamoe.parallel.guard import guarded
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.params import get_spec
from megamoe.precision import accum_dtype, upcast
from megamoe.training.optim import param_groups

DEFAULT_BUCKET_NUMEL = 2 ** 24   # 64 MiB of fp32 per all-reduce / all-gather
GATHER_IN_FLIGHT = 2             # ZeRO-1 parameter all-gathers outstanding at once
LATE_GRAD_ATTR = "_megamoe_late_grad"


def mark_late_grad(p: torch.Tensor) -> None:
    """p's gradient still changes after backward, before reduce_grads (the tied embedding's
    cross-stage sum, PipelineRunner.sync_tied_grads): GradReducer must not reduce it early.
    Mark before the data-parallel reducer is built."""
    setattr(p, LATE_GRAD_ATTR, True)


def counts_in_norm(p: torch.Tensor, mesh: ParallelMesh) -> bool:
    """Whether this rank's copy of p is the one that counts in the global gradient norm."""
    spec, c = get_spec(p), mesh.coords
    if not spec.norm_counted:
        return False
    if spec.replica_group == "edp":
        return c.edp == 0
    if spec.replica_group == "dp":
        return c.dp == 0
    return c.dp == 0 and c.tp == 0


def _global_norm(local_sq: torch.Tensor) -> torch.Tensor:
    """sqrt of the sum over all ranks (all pipeline stages included) of local squared norms."""
    if dist.get_world_size() > 1:
        with guarded():
            dist.all_reduce(local_sq)
    return local_sq.sqrt()


class _GradBucket:
    """Gradients of some parameters sharing a reduce group, all-reduced as one flat tensor."""

    def __init__(self, name: str, params: list, late: bool, mesh: ParallelMesh):
        self.name, self.params, self.late = name, params, late
        self.group, self.size = mesh.group(name), mesh.size(name)
        self.pending = 0                 # parameters not yet final in this step
        self.work = self.flat = self.grads = None

    def launch(self) -> None:
        """Start the all-reduce of the current gradients. The flat tensor is a copy, except for
        a bucket of one parameter: then it is a view and .grad is reduced in place (no copy of
        the large embedding / head), so until reduce_grads its value is in flux."""
        if self.size == 1:
            return                       # nothing to exchange; finish() scales in place
        self.grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.flat = _flatten_dense_tensors(self.grads)
        with guarded(self.group):
            self.work = dist.all_reduce(self.flat, group=self.group, async_op=True)

    def finish(self, dp: int) -> None:
        """Wait for the all-reduce, divide by dp and write the result into the .grad tensors."""
        if self.work is None:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                elif dp > 1:
                    p.grad.div_(dp)
        else:
            with guarded(self.group):
                self.work.wait()
            self.flat.div_(dp)
            for p, g in zip(self.params, _unflatten_dense_tensors(self.flat, self.grads)):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
        self.work, self.flat, self.grads = None, None, None


class GradReducer:
    """Plain data parallel: bucketed all-reduce of the gradients, overlapped with backward.

    Buckets hold parameters of one reduce group, in backward order (last layers first), and
    are launched in one fixed order: by when their last parameter is expected to be final,
    parameters marked with mark_late_grad in buckets of their own at the end. Every rank of
    a group holds the same parameters, so each group sees the same sequence of collectives.

    Readiness: no_sync(params, last=True) arms `params` for the step's last backward through
    them (MicroBatchLoop: the whole model before the last micro-batch; PipelineRunner: each
    chunk when its last micro-batch's backward starts). A post-accumulate-grad hook marks an
    armed parameter final when its gradient is accumulated; when the next bucket in launch
    order has no pending parameter, it (and every following complete one) is launched with
    an async all-reduce, while the rest of the backward runs. Launching strictly in order
    keeps the collectives matched across ranks even if readiness order differed. Gradients of
    earlier micro-batches (not armed) only accumulate.

    reduce_grads() launches what is left, in the same order (buckets with a parameter that
    got no gradient in the last backward: unused experts, parameters outside the graph; late
    ones; everything when nothing was armed), then waits on each bucket, divides by dp and
    writes the result back; a missing gradient counts as zeros. overlap=False never arms
    (everything is reduced in reduce_grads, as before)."""

    def __init__(self, model: torch.nn.Module, mesh: ParallelMesh, bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 overlap: bool = True):
        self.model, self.mesh, self.overlap = model, mesh, overlap
        # Reverse order: backward finishes the last layers first.
        order = list(reversed([p for p in model.parameters() if p.requires_grad]))
        by_group: dict[tuple[bool, str], list[torch.nn.Parameter]] = {}
        for p in order:
            by_group.setdefault((bool(getattr(p, LATE_GRAD_ATTR, False)), get_spec(p).reduce_group), []).append(p)
        self.buckets: list[_GradBucket] = []
        for late, name in sorted(by_group):          # same order on every rank
            current, numel = [], 0
            for p in by_group[(late, name)]:
                if current and numel + p.numel() > bucket_numel:
                    self.buckets.append(_GradBucket(name, current, late, mesh))
                    current, numel = [], 0
                current.append(p)
                numel += p.numel()
            if current:
                self.buckets.append(_GradBucket(name, current, late, mesh))
        # Launch order: a bucket is complete when its last parameter (in backward order) is,
        # so sort by that; groups interleave instead of one group waiting for all of another.
        position = {id(p): i for i, p in enumerate(order)}
        self.buckets.sort(key=lambda b: (b.late, position[id(b.params[-1])]))
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulated) for p in order]
        self._reset()

    def _reset(self) -> None:
        self._armed: set[int] = set()   # ids of params in their last backward of the step
        self._final: set[int] = set()   # ids of params whose gradient is final
        self._next = 0                   # index of the next bucket to launch
        for b in self.buckets:
            b.pending = 0 if b.late else len(b.params)

    @contextlib.contextmanager
    def no_sync(self, params, last: bool):
        """Context around one backward through `params`; last=True: the step's last one."""
        if last and self.overlap:
            self._armed.update(id(p) for p in params if id(p) in self._bucket_of)
        yield

    def _accumulated(self, p: torch.Tensor) -> None:
        key = id(p)
        if key not in self._armed:
            return                       # an earlier micro-batch: gradients only accumulate
        if key in self._final:
            # A second accumulation in the "last" backward (a parameter used in two backward
            # passes after no_sync(last=True)): its bucket may already be reduced without it.
            raise RuntimeError("a gradient was accumulated again after its last backward of the "
                               "step had completed it; call no_sync(..., last=True) only around "
                               "the last backward through those parameters")
        self._final.add(key)
        b = self.buckets[self._bucket_of[key]]
        if not b.late:
            b.pending -= 1
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0 \
                and not self.buckets[self._next].late:
            self.buckets[self._next].launch()
            self._next += 1

    def reduce_grads(self) -> None:
        # Whatever did not start during backward starts now, still in bucket order.
        while self._next < len(self.buckets):
            self.buckets[self._next].launch()
            self._next += 1
        try:
            for b in self.buckets:
                b.finish(self.mesh.dp)
        finally:
            self._reset()

    def grad_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        device = params[0].device if params else torch.device("cpu")
        sq = torch.zeros((), dtype=accum_dtype(params[0].dtype) if params else torch.float32, device=device)
        for p in params:
            if counts_in_norm(p, self.mesh):
                sq += upcast(p.grad).pow(2).sum()
        return _global_norm(sq)


# ----------------------------------------------------------------------------------- ZeRO-1

class _Bucket:
    """Flat param / grad buffers of params sharing a shard group and a weight-decay setting."""

    def __init__(self, named_params, group_name: str, decay: bool, mesh: ParallelMesh):
        self.group_name, self.decay = group_name, decay
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
        # fp32 master copy of this rank's slice (the optimizer steps this, not the model params)
        self.master = torch.nn.Parameter(upcast(self.param_buf[self.lo:self.hi].detach()).clone())
        # Params whose gradient is a per-TP-rank partial sum: summed over TP before the reduce-scatter.
        self.tp_partial = [i for i, p in enumerate(self.params)
                           if get_spec(p).reduce_group == "dp_tp" and mesh.tp > 1]
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

    def layout(self) -> dict:
        return {"group": self.group_name, "decay": self.decay, "shard": [self.lo, self.hi],
                "numel": self.param_buf.numel(),
                "params": [{"name": n, "offset": o, "shape": list(p.shape), "spec": get_spec(p).to_dict()}
                           for n, p, o in zip(self.names, self.params, self.offsets)]}


class ZeroOptimizer:
    """ZeRO-1 AdamW. Same interface as the torch optimizer the trainer uses (param_groups,
    zero_grad, step, state_dict, load_state_dict) plus no_sync() / reduce_grads() / grad_norm().
    zero_grad always zeroes the flat gradient buffer (set_to_none is ignored: the views must stay)."""

    def __init__(self, model: torch.nn.Module, optim_cfg, mesh: ParallelMesh,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL):
        self.mesh, self.bucket_numel = mesh, bucket_numel   # bucket_numel: per parameter all-gather
        decay_ids = {id(p) for p in param_groups(model, optim_cfg.weight_decay)[0]["params"]}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.buckets: list[_Bucket] = []
        for group_name in ("dp", "edp"):
            for decay in (True, False):
                chosen = [(n, p) for n, p in named
                          if ("edp" if get_spec(p).replica_group == "edp" else "dp") == group_name
                          and (id(p) in decay_ids) == decay]
                if chosen:
                    self.buckets.append(_Bucket(chosen, group_name, decay, mesh))
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

    def no_sync(self, params, last: bool):
        """Nothing to arm: the reduce-scatter runs in reduce_grads (see the module docstring)."""
        return contextlib.nullcontext()

    def reduce_grads(self) -> None:
        tp_group = self.mesh.group("tp")
        for b in self.buckets:
            b.collect_grads()
            if b.tp_partial:
                views = [b.grad_view(i) for i in b.tp_partial]
                flat = C.all_reduce_(_flatten_dense_tensors(views), tp_group)
                for v, g in zip(views, _unflatten_dense_tensors(flat, views)):
                    v.copy_(g)
            shard = b.grad_buf[b.lo:b.hi]
            if b.size > 1:
                out = torch.empty_like(shard)
                C.reduce_scatter_flat(out, b.grad_buf, b.group)
                shard.copy_(out)
            shard.div_(self.mesh.dp)

    def grad_norm(self) -> torch.Tensor:
        device = self.buckets[0].grad_buf.device if self.buckets else torch.device("cpu")
        dtype = self.buckets[0].master.dtype if self.buckets else torch.float32
        sq = torch.zeros((), dtype=dtype, device=device)
        for b in self.buckets:
            g = upcast(b.grad_buf[b.lo:b.hi])
            sq += (g * g).sum() if b.norm_mask is None else (g * g * b.norm_mask).sum()
        return _global_norm(sq)

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
            with_master = b.param_buf.dtype != b.master.dtype
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


__all__ = ["GradReducer", "ZeroOptimizer", "counts_in_norm", "mark_late_grad", "DEFAULT_BUCKET_NUMEL"]
