"""Differentiable collectives, each a tiny autograd.Function with an explicit process group.

Gradient convention (Megatron): a tensor that is replicated on every rank of a group carries
the *full* gradient on every rank; a tensor split across the group carries the gradient of
its own piece. The pairs below are each other's transposes:

    copy_to(x)            fwd identity            bwd all-reduce     (enter a TP region)
    reduce_from(x)        fwd all-reduce          bwd identity       (leave a TP region)
    sum_across(x)         fwd all-reduce          bwd all-reduce     (a sum each rank uses differently)
    scatter_to(x, dim)    fwd keep own chunk      bwd all-gather
    gather_from(x, dim)   fwd all-gather          bwd keep own chunk
    reduce_scatter(x,dim) fwd reduce-scatter      bwd all-gather     (sequence parallel: leave)
    all_gather(x, dim)    fwd all-gather          bwd reduce-scatter (sequence parallel: enter)
    all_to_all(x, in_splits, out_splits)  rows exchanged by split sizes; bwd the reverse exchange
    all_to_all_grad_as(x, ..., grad_dtype) the same, the backward exchange in grad_dtype
    all_to_all_async(x, ...) -> Exchange   the same, started now; .wait() -> the rows. Its
                          backward exchange is also asynchronous: started when the rows' gradient
                          is ready, waited on when x's gradient is needed, so other backward work
                          runs while it travels

All return x unchanged (no communication) when the group has one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.parallel.guard import guarded   # timeouts become errors naming the group


def group_size(group) -> int:
    return dist.get_world_size(group)


def group_rank(group) -> int:
    return dist.get_rank(group)


# ----------------------------------------------------------------- plain (non-autograd) helpers

# torch 2.13 renamed the flat-tensor collectives (the old names warn); use whichever exists.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """out = cat over ranks of inp, along dim 0 (out has n * inp.shape[0] rows)."""
    with guarded(group):
        _all_gather_flat(out, inp, group=group)


def reduce_scatter_flat(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """out = this rank's 1/n of the sum over ranks of inp, along dim 0."""
    with guarded(group):
        _reduce_scatter_flat(out, inp, group=group)


def all_reduce_(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce; returns t."""
    if group_size(group) > 1:
        with guarded(group):
            dist.all_reduce(t, op=op, group=group)
    return t


def _all_gather_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((n * x0.shape[0],) + tuple(x0.shape[1:]))
    all_gather_flat(out, x0, group)
    return out.movedim(0, dim)


def _reduce_scatter_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split into {n} equal parts")
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((x0.shape[0] // n,) + tuple(x0.shape[1:]))
    reduce_scatter_flat(out, x0, group)
    return out.movedim(0, dim)


def _own_chunk(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"dim {dim} of size {x.shape[dim]} does not split into {n} equal parts")
    return x.chunk(n, dim=dim)[group_rank(group)].contiguous()


def _start_all_to_all_rows(x: torch.Tensor, group, in_splits: list[int], out_splits: list[int]):
    """Launch the exchange of x's rows: -> (output buffer, work); the buffer is filled once the
    work is waited for."""
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    with guarded(group):
        work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group, async_op=True)
    return out, work


def _all_to_all_rows(x: torch.Tensor, group, in_splits: list[int], out_splits: list[int]) -> torch.Tensor:
    out, work = _start_all_to_all_rows(x, group, in_splits, out_splits)
    with guarded(group):
        work.wait()
    return out


# ----------------------------------------------------------------------- autograd functions

class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.contiguous().clone(), ctx.group), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return all_reduce_(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SumAcross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_reduce_(x.contiguous().clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_(grad.contiguous().clone(), ctx.group), None


class _ScatterTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _own_chunk(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, ctx.group, ctx.dim), None, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather_dim(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _own_chunk(grad, ctx.group, ctx.dim), None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter_dim(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim(grad, ctx.group, ctx.dim), None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather_dim(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_dim(grad, ctx.group, ctx.dim), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, in_splits, out_splits, on_send):
        ctx.group, ctx.in_splits, ctx.out_splits, ctx.on_send = group, in_splits, out_splits, on_send
        if on_send is not None:
            on_send(x, in_splits, False)
        return _all_to_all_rows(x, group, in_splits, out_splits)

    @staticmethod
    def backward(ctx, grad):
        if ctx.on_send is not None:
            ctx.on_send(grad, ctx.out_splits, True)
        return _all_to_all_rows(grad, ctx.group, ctx.out_splits, ctx.in_splits), None, None, None, None


class _AllToAllGradAs(_AllToAll):
    """_AllToAll whose backward exchange travels in `grad_dtype` (and is returned in x's dtype):
    for a forward tensor kept in a wider dtype than its gradient needs."""

    @staticmethod
    def forward(ctx, x, group, in_splits, out_splits, on_send, grad_dtype):
        ctx.grad_dtype, ctx.x_dtype = grad_dtype, x.dtype
        return _AllToAll.forward(ctx, x, group, in_splits, out_splits, on_send)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.to(ctx.grad_dtype)
        if ctx.on_send is not None:
            ctx.on_send(grad, ctx.out_splits, True)
        out = _all_to_all_rows(grad, ctx.group, ctx.out_splits, ctx.in_splits)
        return out.to(ctx.x_dtype), None, None, None, None, None


class _Flight:
    """One asynchronous exchange and its backward: shared by _AllToAllStart and _AllToAllWait."""

    def __init__(self, group, in_splits, out_splits, on_send, grad_dtype):
        self.group, self.in_splits, self.out_splits = group, in_splits, out_splits
        self.on_send, self.grad_dtype = on_send, grad_dtype
        self.work = self.grad_work = self.grad_buf = None
        self.x_dtype, self.needs_grad = None, False

    def start(self, x: torch.Tensor, in_splits, out_splits, backward: bool):
        """Launch x's exchange: -> (output buffer, work). Filled only after work.wait()."""
        if self.on_send is not None:
            self.on_send(x, in_splits, backward)
        return _start_all_to_all_rows(x, self.group, in_splits, out_splits)

    def wait(self, work) -> None:
        with guarded(self.group):
            work.wait()


class _AllToAllStart(torch.autograd.Function):
    """Launches the exchange; returns the (not yet filled) output. Backward: waits for the
    reverse exchange that _AllToAllWait.backward started and returns its result."""

    @staticmethod
    def forward(ctx, x, flight):
        ctx.flight = flight
        flight.x_dtype, flight.needs_grad = x.dtype, x.requires_grad
        out, flight.work = flight.start(x, flight.in_splits, flight.out_splits, False)
        return out

    @staticmethod
    def backward(ctx, _unused):
        f = ctx.flight
        f.wait(f.grad_work)
        grad, f.grad_buf, f.grad_work = f.grad_buf, None, None
        return grad.to(f.x_dtype), None


class _AllToAllWait(torch.autograd.Function):
    """Waits for the exchange; identity on its rows. Backward: starts the reverse exchange of
    the gradient (in grad_dtype) and passes the gradient through untouched: _AllToAllStart's
    backward, which the engine runs once other ready work is done, waits for it."""

    @staticmethod
    def forward(ctx, out, flight):
        ctx.flight = flight
        flight.wait(flight.work)
        flight.work = None
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        f = ctx.flight
        if f.needs_grad:
            g = grad if f.grad_dtype is None else grad.to(f.grad_dtype)
            f.grad_buf, f.grad_work = f.start(g, f.out_splits, f.in_splits, True)
        return grad, None


class Exchange:
    """An all-to-all in flight: `wait()` returns its rows (differentiably), once."""

    def __init__(self, out: torch.Tensor, flight: _Flight | None):
        self._out, self._flight = out, flight

    def wait(self) -> torch.Tensor:
        assert self._out is not None, "Exchange.wait() called twice"
        out, self._out = self._out, None
        return out if self._flight is None else _AllToAllWait.apply(out, self._flight)


# --------------------------------------------------------------------------- public functions

def copy_to(x, group):
    return x if group_size(group) == 1 else _CopyTo.apply(x, group)


def reduce_from(x, group):
    return x if group_size(group) == 1 else _ReduceFrom.apply(x, group)


def sum_across(x, group):
    return x if group_size(group) == 1 else _SumAcross.apply(x, group)


def scatter_to(x, group, dim: int = -1):
    return x if group_size(group) == 1 else _ScatterTo.apply(x, group, dim)


def gather_from(x, group, dim: int = -1):
    return x if group_size(group) == 1 else _GatherFrom.apply(x, group, dim)


def reduce_scatter(x, group, dim: int = 1):
    return x if group_size(group) == 1 else _ReduceScatter.apply(x, group, dim)


def all_gather(x, group, dim: int = 1):
    return x if group_size(group) == 1 else _AllGather.apply(x, group, dim)


def all_to_all(x, group, in_splits: list[int], out_splits: list[int], on_send=None):
    """x[sum(in_splits), ...] -> [sum(out_splits), ...]: rows in_splits[j] go to rank j, and
    out_splits[j] rows arrive from rank j, in rank order. `on_send(tensor, splits, backward)` is
    called before each exchange (forward and backward), e.g. to count bytes."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, list(in_splits), list(out_splits), on_send)


def all_to_all_grad_as(x, group, in_splits: list[int], out_splits: list[int], grad_dtype: torch.dtype,
                       on_send=None):
    """all_to_all whose backward sends the gradient in `grad_dtype` (returned in x's dtype). For
    a tensor sent in a wider dtype than its gradient needs (e.g. fp32 partial sums whose
    gradients are exactly bf16 values): the backward exchange keeps the narrow dtype's bytes."""
    if group_size(group) == 1:
        return x
    if grad_dtype == x.dtype:
        return all_to_all(x, group, in_splits, out_splits, on_send)
    return _AllToAllGradAs.apply(x, group, list(in_splits), list(out_splits), on_send, grad_dtype)


def all_to_all_async(x, group, in_splits: list[int], out_splits: list[int], on_send=None,
                     grad_dtype: torch.dtype | None = None) -> Exchange:
    """all_to_all (or all_to_all_grad_as with grad_dtype) started now and finished by the
    returned Exchange's wait(): the work between the two overlaps the transfer. Every rank of
    the group must start its exchanges in the same order (as for any collective)."""
    if group_size(group) == 1:
        return Exchange(x, None)
    if grad_dtype == x.dtype:
        grad_dtype = None
    flight = _Flight(group, list(in_splits), list(out_splits), on_send, grad_dtype)
    return Exchange(_AllToAllStart.apply(x, flight), flight)


__all__ = ["copy_to", "reduce_from", "sum_across", "scatter_to", "gather_from", "reduce_scatter",
           "all_gather", "all_to_all", "all_to_all_grad_as", "all_to_all_async", "Exchange", "all_reduce_", "all_gather_flat", "reduce_scatter_flat", "group_size", "group_rank"]
