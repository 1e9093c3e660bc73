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
ZeroOptimizer   ZeRO-1 (megamoe.parallel.zero), with the same bucket launcher.
Both expose no_sync(params, last), reduce_grads() and grad_norm() for ParallelContext. The norm
counts every global element once: TP shards each once, TP copies on TP rank 0 only, DP /
expert-DP replicas once.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megamoe.parallel.guard import guarded
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.params import get_spec
from megamoe.precision import accum_dtype, upcast

DEFAULT_BUCKET_NUMEL = 2 ** 24   # 64 MiB of fp32 per all-reduce / all-gather
LATE_GRAD_ATTR = "_megamoe_late_grad"


def mark_late_grad(p: torch.Tensor) -> None:
    """p's gradient still changes after backward, before reduce_grads (the tied embedding's
    cross-stage sum, PipelineRunner.sync_tied_grads): GradReducer / ZeroOptimizer must not
    reduce it early.
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


def global_norm(local_sq: torch.Tensor) -> torch.Tensor:
    """sqrt of the sum over all ranks (all pipeline stages included) of local squared norms."""
    if dist.get_world_size() > 1:
        with guarded():
            dist.all_reduce(local_sq)
    return local_sq.sqrt()


class _GradBucket:
    """Gradients of some parameters sharing a reduce group, all-reduced as one flat tensor."""

    def __init__(self, name: str, params: list, deferred: bool, mesh: ParallelMesh):
        self.name, self.params, self.deferred = name, params, deferred
        self.group, self.size = mesh.group(name), mesh.size(name)
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


class BucketLauncher:
    """Launches buckets of gradients in one fixed order, as soon as each is final: the
    readiness logic shared by GradReducer (all-reduce) and ZeroOptimizer (reduce-scatter).

    A bucket has .params, .deferred (reduced only in launch_rest: gradients that change after
    backward, mark_late_grad) and .launch(). Buckets are launched in list order: by when their
    last parameter is expected to be final (backward order), deferred ones at the end. Every
    rank of a group holds the same buckets, so each group sees the same sequence of collectives.

    Readiness: no_sync(params, last=True) arms `params` for the step's last backward through
    them (MicroBatchLoop: the whole model before the last micro-batch; PipelineRunner: each
    chunk when its last micro-batch's backward starts). A post-accumulate-grad hook marks an
    armed parameter final when its gradient is accumulated; when the next bucket in launch
    order has no pending parameter, it (and every following complete one) is launched while
    the rest of the backward runs. Launching strictly in order keeps the collectives matched
    across ranks even if readiness order differed. Gradients of earlier micro-batches (not
    armed) only accumulate. launch_rest() launches what is left, in the same order (buckets
    with a parameter that got no gradient in the last backward: unused experts, parameters
    outside the graph; deferred ones; everything when nothing was armed). overlap=False never
    arms."""

    def __init__(self, buckets: list, backward_order: list, overlap: bool = True):
        position = {id(p): i for i, p in enumerate(backward_order)}
        self.buckets = sorted(buckets, key=lambda b: (b.deferred, position[id(b.params[-1])]))
        self.overlap = overlap
        self._bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulated)
                       for p in backward_order if id(p) in self._bucket_of]
        self.reset()

    def reset(self) -> None:
        self._armed: set[int] = set()   # ids of params in their last backward of the step
        self._final: set[int] = set()   # ids of params whose gradient is final
        self._next = 0                   # index of the next bucket to launch
        self._pending = [0 if b.deferred else len(b.params) for b in self.buckets]

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
        i = self._bucket_of[key]
        if not self.buckets[i].deferred:
            self._pending[i] -= 1
            while self._next < len(self.buckets) and self._pending[self._next] == 0 \
                    and not self.buckets[self._next].deferred:
                self.buckets[self._next].launch()
                self._next += 1

    def launch_rest(self) -> None:
        while self._next < len(self.buckets):
            self.buckets[self._next].launch()
            self._next += 1


def split_buckets(items: list, bucket_numel: int, numel=lambda p: p.numel()) -> list[list]:
    """Consecutive runs of `items` (parameters, or anything `numel` sizes) of at most
    bucket_numel elements (a larger one alone)."""
    out, current, total = [], [], 0
    for item in items:
        n = numel(item)
        if current and total + n > bucket_numel:
            out.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    return out + ([current] if current else [])


class BucketedReduction:
    """What GradReducer and ZeroOptimizer share: buckets launched by a BucketLauncher
    (self.launcher, self.buckets, self.mesh), each with finish(dp) to wait and scale."""

    @property
    def overlap(self) -> bool:
        return self.launcher.overlap

    @overlap.setter
    def overlap(self, value: bool) -> None:
        self.launcher.overlap = value

    def no_sync(self, params, last: bool):
        return self.launcher.no_sync(params, last)

    def reduce_grads(self) -> None:
        # Whatever did not start during backward starts now, still in bucket order.
        self.launcher.launch_rest()
        try:
            for b in self.buckets:
                b.finish(self.mesh.dp)
        finally:
            self.launcher.reset()


class GradReducer(BucketedReduction):
    """Plain data parallel: bucketed all-reduce of the gradients, overlapped with backward.

    Buckets hold parameters of one reduce group, in backward order (last layers first), with
    parameters marked with mark_late_grad in buckets of their own, reduced last; BucketLauncher
    starts each bucket's async all-reduce as soon as its gradients are final.
    reduce_grads() launches what is left, then waits on each bucket, divides by dp and writes
    the result back; a missing gradient counts as zeros. overlap=False: everything is reduced
    in reduce_grads."""

    def __init__(self, model: torch.nn.Module, mesh: ParallelMesh, bucket_numel: int = DEFAULT_BUCKET_NUMEL,
                 overlap: bool = True):
        self.model, self.mesh = model, mesh
        # Reverse order: backward finishes the last layers first.
        order = list(reversed([p for p in model.parameters() if p.requires_grad]))
        by_group: dict[tuple[bool, str], list[torch.nn.Parameter]] = {}
        for p in order:
            by_group.setdefault((bool(getattr(p, LATE_GRAD_ATTR, False)), get_spec(p).reduce_group), []).append(p)
        buckets = [_GradBucket(name, chunk, late, mesh)
                   for late, name in sorted(by_group)          # same order on every rank
                   for chunk in split_buckets(by_group[(late, name)], bucket_numel)]
        self.launcher = BucketLauncher(buckets, order, overlap)
        self.buckets = self.launcher.buckets

    def grad_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        device = params[0].device if params else torch.device("cpu")
        sq = torch.zeros((), dtype=accum_dtype(params[0].dtype) if params else torch.float32, device=device)
        for p in params:
            if counts_in_norm(p, self.mesh):
                sq += upcast(p.grad).pow(2).sum()
        return global_norm(sq)


__all__ = ["GradReducer", "BucketLauncher", "BucketedReduction", "split_buckets", "counts_in_norm", "global_norm", "mark_late_grad",
           "DEFAULT_BUCKET_NUMEL"]
