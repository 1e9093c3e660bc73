"""Tensor-parallel layers (Megatron style) and the vocab-parallel cross-entropy.

Legend: B batch, S sequence, H d_model, V vocabulary, tp tensor-parallel size, ... any leading dims.

ColumnParallelLinear  y[..., out/tp] = x[..., in] W_r^T   W_r = rows r of W (output features)
RowParallelLinear     y[..., out]    = sum_r x_r[..., in/tp] W_r^T (+ b), summed by all-reduce,
                      or by reduce-scatter along the sequence dim under sequence parallelism
VocabParallelEmbedding  rows [r*V/tp, (r+1)*V/tp) of the table; other ids give zeros; summed
ShardedRMSNorm        RMSNorm over a last dim split across TP (OLMoE's QK-norm over all heads)
vocab_parallel_cross_entropy  equals F.cross_entropy over the full vocabulary

Input modes of the column layers (how the replicated / sequence-sharded input enters):
  "none"       the caller already prepared it (e.g. one gather shared by q, k and v)
  "copy"       copy_to: identity forward, all-reduce of the input gradient backward
  "sp_gather"  all-gather along the sequence dim (dim 1), reduce-scatter backward
Each layer records a ParamSpec on the parameters it creates (see params.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megamoe.parallel import collectives as C
from megamoe.parallel.params import set_spec, sharded_index
from megamoe.precision import upcast

SEQ_DIM = 1  # activations are [B, S, H]; sequence parallelism splits S


def enter_tp(x: torch.Tensor, group, mode: str) -> torch.Tensor:
    if mode == "none":
        return x
    if mode == "copy":
        return C.copy_to(x, group)
    if mode == "sp_gather":
        return C.all_gather(x, group, SEQ_DIM)
    raise ValueError(f"unknown TP input mode {mode!r}; use none, copy or sp_gather")


def leave_tp(x: torch.Tensor, group, mode: str) -> torch.Tensor:
    if mode == "all_reduce":
        return C.reduce_from(x, group)
    if mode == "sp_scatter":
        return C.reduce_scatter(x, group, SEQ_DIM)
    raise ValueError(f"unknown TP output mode {mode!r}; use all_reduce or sp_scatter")


def _shard(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if t.shape[dim] % size:
        raise ValueError(f"cannot split dim {dim} of size {t.shape[dim]} into {size} equal parts")
    return t.detach().chunk(size, dim=dim)[rank].clone()


class ColumnParallelLinear(nn.Module):
    def __init__(self, linear: nn.Linear, group, input_mode: str = "none"):
        super().__init__()
        self.group, self.input_mode = group, input_mode
        rank, size = C.group_rank(group), C.group_size(group)
        self.in_features, self.out_features = linear.in_features, linear.out_features // size
        self.weight = nn.Parameter(_shard(linear.weight, 0, rank, size))           # [out/tp, in]
        set_spec(self.weight, replica_group="dp", global_shape=tuple(linear.weight.shape),
                 index=sharded_index(linear.weight.shape, 0, rank, size))
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(_shard(linear.bias, 0, rank, size))
            set_spec(self.bias, replica_group="dp", global_shape=tuple(linear.bias.shape),
                     index=sharded_index(linear.bias.shape, 0, rank, size))

    def forward(self, x):
        return F.linear(enter_tp(x, self.group, self.input_mode), self.weight, self.bias)

    def extra_repr(self):
        return f"in={self.in_features}, out_local={self.out_features}, input={self.input_mode}"


class RowParallelLinear(nn.Module):
    def __init__(self, linear: nn.Linear, group, output_mode: str = "all_reduce"):
        super().__init__()
        self.group, self.output_mode = group, output_mode
        rank, size = C.group_rank(group), C.group_size(group)
        self.in_features, self.out_features = linear.in_features // size, linear.out_features
        self.weight = nn.Parameter(_shard(linear.weight, 1, rank, size))           # [out, in/tp]
        set_spec(self.weight, replica_group="dp", global_shape=tuple(linear.weight.shape),
                 index=sharded_index(linear.weight.shape, 1, rank, size))
        self.bias = None
        if linear.bias is not None:
            # Added after the reduction, so it is a full copy; under sequence parallelism each
            # rank's gradient covers only its own tokens.
            self.bias = nn.Parameter(linear.bias.detach().clone())
            set_spec(self.bias, replica_group="dp_tp", tp_partial=output_mode == "sp_scatter")

    def forward(self, x):
        y = leave_tp(F.linear(x, self.weight), self.group, self.output_mode)
        return y if self.bias is None else y + self.bias

    def extra_repr(self):
        return f"in_local={self.in_features}, out={self.out_features}, output={self.output_mode}"


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over TP; output summed (all-reduce, or reduce-scatter along S)."""

    def __init__(self, embedding: nn.Embedding, group, output_mode: str = "all_reduce"):
        super().__init__()
        self.group, self.output_mode = group, output_mode
        rank, size = C.group_rank(group), C.group_size(group)
        vocab = embedding.num_embeddings
        if vocab % size:
            raise ValueError(f"vocabulary {vocab} is not divisible by tp {size}; pad the vocabulary")
        self.num_local = vocab // size
        self.vocab_start = rank * self.num_local
        self.weight = nn.Parameter(_shard(embedding.weight, 0, rank, size))         # [V/tp, H]
        set_spec(self.weight, replica_group="dp", global_shape=tuple(embedding.weight.shape),
                 index=sharded_index(embedding.weight.shape, 0, rank, size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.num_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp(out, self.group, self.output_mode)


class ShardedRMSNorm(nn.Module):
    """RMSNorm whose normalised dim is split across TP: the mean of squares needs the sum over
    all ranks (sum_across: each rank normalises its own slice with the shared statistic)."""

    def __init__(self, norm: nn.Module, group):
        super().__init__()
        if not hasattr(norm, "eps") or not isinstance(getattr(norm, "weight", None), torch.Tensor) \
                or isinstance(norm, nn.LayerNorm):
            raise ValueError("QK-norm under tensor parallelism supports RMSNorm only (model.norm rmsnorm)")
        self.group, self.eps = group, norm.eps
        rank, size = C.group_rank(group), C.group_size(group)
        self.global_dim = norm.weight.shape[0]
        self.weight = nn.Parameter(_shard(norm.weight, 0, rank, size))
        set_spec(self.weight, replica_group="dp", global_shape=tuple(norm.weight.shape),
                 index=sharded_index(norm.weight.shape, 0, rank, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = upcast(x)
        sq = C.sum_across(x32.pow(2).sum(-1, keepdim=True), self.group)
        normed = x32 * torch.rsqrt(sq / self.global_dim + self.eps)
        return (normed * self.weight.to(x32.dtype)).to(x.dtype)


# ------------------------------------------------------------------------ vocab-parallel loss

class _VocabParallelCE(torch.autograd.Function):
    """Per-token loss from vocab-sharded logits [N, V/tp]; same math as F.cross_entropy:
    loss = log(sum_v exp(x_v - m)) - (x_label - m), m = global max (a constant shift)."""

    @staticmethod
    def forward(ctx, logits, labels, group, vocab_start):
        n_local = logits.shape[-1]
        m = C.all_reduce_(logits.max(dim=-1).values.clone(), group, dist.ReduceOp.MAX)
        shifted = logits - m.unsqueeze(-1)
        local_label = labels - vocab_start
        mine = (local_label >= 0) & (local_label < n_local)
        local_label = local_label.masked_fill(~mine, 0)
        target = shifted.gather(-1, local_label.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp()
        stats = C.all_reduce_(torch.stack([exp.sum(-1), target]), group)   # [2, N]
        sum_exp, target = stats[0], stats[1]
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_label, mine)  # softmax
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_label, mine = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_label] -= mine.to(grad.dtype)
        return grad * grad_loss.unsqueeze(-1), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group,
                                 vocab_start: int, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy in fp32; logits [..., V/tp] (this rank's vocab slice starting at
    `vocab_start`), labels [...] global ids. Tokens with label == ignore_index are left out."""
    flat = upcast(logits).reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    valid = labels != ignore_index
    losses = _VocabParallelCE.apply(flat, labels.masked_fill(~valid, 0), group, vocab_start)
    return (losses * valid).sum() / valid.sum()


class VocabParallelLoss:
    """ctx.loss_fn under TP: (logits [B, S, V/tp], labels [B, S]) -> mean CE."""

    def __init__(self, group, vocab_start: int):
        self.group, self.vocab_start = group, vocab_start

    def __call__(self, logits, labels):
        return vocab_parallel_cross_entropy(logits, labels, self.group, self.vocab_start)


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "ShardedRMSNorm",
           "VocabParallelLoss", "vocab_parallel_cross_entropy", "enter_tp", "leave_tp", "SEQ_DIM"]
