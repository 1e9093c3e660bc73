#!/usr/bin/env python
"""Host synchronisations of one expert-parallel training step, against a budget.

    python benchmarks/host_syncs.py            # EP2, 2 micro-batches, 2 MoE layers, recompute

Two gloo processes on CPU run one full training step (the trainer's own train_step: forward,
backward with activation checkpointing, gradient reduction, clip, optimizer step) of a tiny MoE
with expert parallelism 2, and count every operation that would make the CPU wait for the GPU
on CUDA:
  - through a TorchDispatchMode: aten._local_scalar_dense (.item(), bool(), float() of a
    tensor), nonzero, masked_select, boolean-mask indexing, repeat_interleave without
    output_size, unique;
  - by wrapping torch.Tensor.tolist / .cpu / .numpy (on CPU tensors these do not reach the
    dispatcher, on CUDA each is a device-to-host copy).
The optimizer's own step is left out: torch's AdamW reads its step counter from a CPU scalar
(no device sync on GPU either; the fused variant used on GPU has none at all). So are checks
that megamoe runs on CPU tensors only (ops.permute's check_num_valid, skipped on CUDA).
The expert GEMMs use the grouped_mm backend (what runs on sm90 in bf16); the loop backend
needs the counts on the host by design.

Budget: B = MoE-layer forwards in the step (each may transfer its split sizes once: 2 micro-
batches x 2 layers; selective recompute, the default, runs none of them again, `--recompute
full` does) + 2. The last line is `host_syncs_per_step N budget B`.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from megamoe.config import preset  # noqa: E402
from megamoe.parallel.spawn import spawn  # noqa: E402

SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}
SEQ, VOCAB = 32, 256


# Checks that megamoe runs on CPU tensors only (skipped for CUDA tensors), so not counted here.
CPU_ONLY = {"check_num_valid"}


def _site() -> str | None:
    """The innermost megamoe frame that caused the sync (file:line function); None for a
    CPU-only check."""
    stack = traceback.extract_stack()[:-3]
    if any(frame.name in CPU_ONLY for frame in stack):
        return None
    for frame in reversed(stack):
        if "/megamoe/" in frame.filename and "benchmarks" not in frame.filename:
            return f"{frame.filename.split('/megamoe/', 1)[1]}:{frame.lineno} {frame.name}"
    return "(outside megamoe)"


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()
        self.paused = False

    def record(self, what: str) -> None:
        site = None if self.paused else _site()
        if site is not None:
            self.sites[f"{what:<28} {site}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.record(f"aten.{name}")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 4:
            self.record("repeat_interleave w/o size")
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                     for i in (args[1] if len(args) > 1 else [])):
            self.record("boolean-mask indexing")
        return func(*args, **kwargs)


def _wrap_host_reads(counter: SyncCounter):
    originals = {}
    for name in ("tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)
        originals[name] = original

        def wrapped(self, *args, _original=original, _name=name, **kwargs):
            if self.numel() > 0:
                counter.record(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)
        setattr(torch.Tensor, name, wrapped)
    return originals


def tiny_cfg(micro_batches: int, recompute: str):
    cfg = preset("tiny")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.ffn_hidden, m.seq_length = VOCAB, 64, 2, 4, 128, SEQ
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden, m.moe.gemm_backend = 8, 2, 32, "grouped_mm"
    cfg.dtype, cfg.activation_checkpointing, cfg.recompute = "fp32", True, recompute
    cfg.micro_batch_size, cfg.global_batch_size, cfg.steps = 2, 2 * 2 * micro_batches, 3
    cfg.parallel.ep = 2
    cfg.eval_interval, cfg.save_interval, cfg.log_interval, cfg.progress = 0, 0, 0, False
    cfg.tensorboard, cfg.watchdog_s, cfg.resume, cfg.out_dir = False, 0, False, "/tmp/megamoe-host-syncs"
    return cfg


def _worker(rank, world, micro_batches, recompute):
    from megamoe.training.build import build_training
    from megamoe.training.trainer import Trainer

    rng = np.random.default_rng(0)
    data = [rng.integers(0, VOCAB, SEQ + 1) for _ in range(64)]
    run = build_training(tiny_cfg(micro_batches, recompute), verbose=False)
    trainer = Trainer(run, data)
    trainer.train_step()                     # warm-up step (lazy state, first-call paths)
    counter = SyncCounter()
    step = trainer.optimizer.step

    def optimizer_step(*args, **kwargs):    # see the module docstring
        counter.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            counter.paused = False
    trainer.optimizer.step = optimizer_step
    forwards = collections.Counter()
    for layer in run.model.moe_layers():
        layer.register_forward_pre_hook(lambda m, a: forwards.update(["moe"]))
    originals = _wrap_host_reads(counter)
    try:
        with counter:
            trainer.train_step()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return {"sites": dict(counter.sites), "moe_forwards": forwards["moe"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--recompute", choices=("selective", "full"), default="selective")
    args = parser.parse_args(argv)
    result = spawn(2, _worker, args.micro_batches, args.recompute)
    sites, forwards = result["sites"], result["moe_forwards"]
    total = sum(sites.values())
    print(f"EP2, {args.micro_batches} micro-batches, 2 MoE layers, activation checkpointing "
          f"({args.recompute} recompute), grouped_mm; rank 0, one training step")
    print(f"{'count':>5}  {'what':<28} where")
    for site, n in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"{n:>5}  {site}")
    print(f"MoE-layer forwards (incl. recompute): {forwards}")
    print(f"host_syncs_per_step {total} budget {forwards + 2}")
    return 0 if total <= forwards + 2 else 1


if __name__ == "__main__":
    sys.exit(main())
