"""build_training(cfg) -> TrainingRun: the one build pipeline, for one process and for many.

The model is plain single-device PyTorch; everything else is applied from outside, here, in
one fixed order:

  1. validate the config once (with the world size) and resolve the backends: "auto" means the
     PyTorch implementation; a configured backend that is unavailable is a one-line ValueError
  2. world > 1: torch.distributed, rank grid, device        (parallel/setup.py: build_mesh)
  3. the plain model, identical on every rank (same seed)
  4. pipeline -> tensor (+ sequence) -> experts              (parallel/setup.py: apply_model_parallel)
  5. to the device, in the parameter dtype (fp32 masters; fp64 in the test mode)
  6. precision: norm implementation, FP8 linears             (apply_precision)
  7. activation checkpointing                                (apply_activation_checkpointing)
  8. schedule: pipeline runner (pp > 1) or the micro-batch loop
  9. data parallel: gradient reduction + optimizer, or ZeRO-1 (every parameter is final by now)
 10. the context the Trainer talks to: LocalContext or ParallelContext (same protocol)

The precision policy itself is written down in megamoe/precision.py.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from megamoe import ops
from megamoe.config import TrainConfig, validate
from megamoe.model.norm import RMSNorm
from megamoe.model.transformer import build_model
from megamoe.moe.experts import resolve_gemm_backend
from megamoe.ops import optional
from megamoe.precision import autocast_context, param_dtype, resolve_dtype
from megamoe.training.context import LocalContext, MicroBatchLoop, cross_entropy
from megamoe.training.optim import build_optimizer

FP8_MULTIPLE = 16   # FP8 GEMMs need both dimensions of a weight to be multiples of 16


@dataclass
class Backends:
    """What a run uses, resolved once at build time and logged once at start."""
    precision: str        # fp32 | bf16 | fp64
    fp8: bool
    permute: str          # cpp | cuda | torch (megamoe.ops.backend)
    gemm: str             # grouped_mm | loop | grouped_gemm | - (dense model)
    norm: str             # torch | apex
    optimizer: str

    def describe(self) -> str:
        policy = {"bf16": "bf16 autocast; fp32 params, grads, reductions, router, norms' statistics, CE",
                  "fp32": "fp32", "fp64": "fp64 (test mode)"}[self.precision]
        return (f"megamoe: backends: precision {policy}{' + FP8 linears (Transformer Engine)' if self.fp8 else ''}"
                f"; permutation {self.permute}; grouped GEMM {self.gemm}; norm {self.norm}"
                f"; optimizer {self.optimizer}")


def resolve_backends(cfg: TrainConfig, device: torch.device) -> Backends:
    dtype = resolve_dtype(cfg.dtype, device)
    compute = torch.bfloat16 if dtype == "bf16" else param_dtype(dtype)
    m = cfg.model
    gemm = resolve_gemm_backend(m.moe.gemm_backend, device, compute) if m.moe is not None else "-"
    if m.norm_impl == "apex":
        if m.norm != "rmsnorm":
            raise ValueError("model.norm_impl apex applies to model.norm rmsnorm only; use norm_impl torch")
        optional.require("apex", "model.norm_impl=apex")
    if cfg.optim.impl == "apex":
        if cfg.parallel.zero1:
            raise ValueError("optim.impl apex does not combine with parallel.zero1 (ZeRO-1 steps "
                             "torch AdamW on its fp32 shards); use optim.impl torch")
        optional.require("apex", "optim.impl=apex")
        optimizer = "apex FusedAdam"
    elif cfg.parallel.zero1:
        optimizer = "ZeRO-1 (torch AdamW on fp32 shards)"
    else:
        optimizer = "torch AdamW" + (" (fused)" if device.type == "cuda" else "")
    if cfg.fp8:
        if cfg.parallel.tp > 1:
            raise ValueError("fp8 with parallel.tp > 1 is not supported: megamoe's tensor-parallel "
                             "linears are not Transformer Engine linears; use parallel.tp 1 with fp8")
        if dtype != "bf16":
            raise ValueError(f"fp8 runs on top of bf16 autocast; set dtype bf16 (dtype {cfg.dtype} "
                             f"resolves to {dtype} on {device.type})")
        optional.require("transformer_engine", "fp8 training")
    return Backends(dtype, cfg.fp8, ops.backend(device), gemm, "apex" if m.norm_impl == "apex" else "torch",
                    optimizer)


# ------------------------------------------------------------------------------- transforms

def swap_modules(model: nn.Module, match, make) -> int:
    """Replace every child for which match(name, child) holds by make(child), keeping each
    parameter's ParamSpec (how it is sharded / reduced / checkpointed) and requires_grad."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not match(name, child):
                continue
            new = make(child)
            for pname, old in child.named_parameters(recurse=False):
                p = getattr(new, pname)
                p.requires_grad_(old.requires_grad)
                if hasattr(old, "_megamoe_spec"):
                    p._megamoe_spec = copy.deepcopy(old._megamoe_spec)
            setattr(parent, name, new)
            swapped += 1
    return swapped


def fp8_eligible(name: str, child: nn.Module) -> bool:
    """Plain dense linears with FP8-compatible shapes; not the head (its logits stay bf16),
    not a gate of width 1 (Qwen's shared-expert gate)."""
    return (type(child) is nn.Linear and name != "lm_head"
            and child.in_features % FP8_MULTIPLE == 0 and child.out_features % FP8_MULTIPLE == 0)


def apply_precision(model: nn.Module, backends: Backends) -> None:
    """Norm implementation and FP8 linears (experts and router keep their own GEMMs)."""
    if backends.norm == "apex":
        swap_modules(model, lambda name, child: type(child) is RMSNorm, optional.apex_rmsnorm)
    if backends.fp8:
        swap_modules(model, fp8_eligible, optional.te_linear)


def apply_activation_checkpointing(model: nn.Module, cfg: TrainConfig) -> None:
    """Recompute in backward: whole blocks (recompute full), or for MoE blocks attention and
    the expert GEMMs only (recompute selective, the default: no all-to-all is repeated).
    Under FP8 through TE's checkpoint, so that the recompute runs in the FP8 state of the
    original forward."""
    if cfg.activation_checkpointing and hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(True, optional.te_checkpoint if cfg.fp8 else None,
                                           selective=cfg.recompute == "selective")


# ------------------------------------------------------------------------------------ the run

@dataclass
class TrainingRun:
    cfg: TrainConfig
    model: nn.Module
    optimizer: object
    ctx: object            # LocalContext | megamoe.parallel.ParallelContext
    device: torch.device
    backends: Backends

    def autocast(self):
        """The forward's precision context: bf16 autocast (+ TE's FP8 autocast with fp8)."""
        stack = contextlib.ExitStack()
        stack.enter_context(autocast_context(self.backends.precision, self.device))
        if self.backends.fp8:
            stack.enter_context(optional.fp8_autocast())
        return stack


def world_size_now() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    from megamoe.parallel.launch import detect_env
    return detect_env().world_size


def build_training(cfg: TrainConfig, model: nn.Module | None = None, device: torch.device | None = None,
                   verbose: bool = True) -> TrainingRun:
    """Build everything a Trainer needs. `model`: a plain model to start from (default: a new
    one from cfg.model and cfg.seed). `device` (one process only): default cuda if available."""
    world = world_size_now()
    validate(cfg, world_size=world)
    setup = None
    if world > 1:
        from megamoe.parallel import setup as par
        setup = par.build_mesh(cfg, verbose)
        device = setup.device
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = resolve_backends(cfg, device)
    if model is None:
        model = build_model(cfg.model, seed=cfg.seed)
    loss_fn, chunk_layers = None, None
    if setup is not None:
        chunk_layers, loss_fn = par.apply_model_parallel(model, setup, cfg)
    dtype = param_dtype(backends.precision)
    model.to(device=device, dtype=dtype)
    apply_precision(model, backends)
    apply_activation_checkpointing(model, cfg)
    if setup is None:
        ctx = LocalContext()
        optimizer = build_optimizer(model, cfg.optim)
    else:
        from megamoe.parallel.context import ParallelContext
        pipeline = par.build_pipeline(model, setup, chunk_layers, cfg, dtype)
        optimizer, grads = par.build_data_parallel(model, setup.mesh, cfg.optim, cfg.parallel.zero1,
                                                   cfg.parallel.dp_bucket_numel, cfg.parallel.overlap_grad_reduce)
        ctx = ParallelContext(setup.mesh, grads, loss_fn or cross_entropy, pipeline or MicroBatchLoop(),
                              zero1=cfg.parallel.zero1, sequence_parallel=setup.sequence_parallel,
                              pipeline=pipeline)
    if verbose and ctx.is_main:
        print(backends.describe(), flush=True)
    return TrainingRun(cfg, model, optimizer, ctx, device, backends)


__all__ = ["TrainingRun", "Backends", "build_training", "resolve_backends", "apply_precision",
           "apply_activation_checkpointing", "swap_modules", "fp8_eligible"]
