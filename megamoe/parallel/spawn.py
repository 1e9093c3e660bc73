"""Run a function in N local processes on one gloo process group (CPU): the distributed tests
and the CPU benchmarks use it to run real collectives without a launcher.

    result = spawn(4, fn, *args)      # fn(rank, world_size, *args) in 4 forked processes;
                                      # rank 0's return value comes back (via a file)
Workers are forked: import what they need in the parent first (`prewarm`) so they start in
~0.1 s, and use one intra-op thread each (set here) so forked OpenMP state is safe.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, out_path, fn, args):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, out_path)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def prewarm() -> None:
    """Import what every worker needs once in the parent (forked workers then start fast)."""
    import megamoe.parallel.setup  # noqa: F401
    import megamoe.training.build  # noqa: F401
    import megamoe.training.trainer  # noqa: F401
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])  # first use imports torch._dynamo


def spawn(world_size: int, fn, *args):
    """fn(rank, world_size, *args) in `world_size` forked gloo processes; rank 0's result."""
    prewarm()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.start_processes(_entry, args=(world_size, free_port(), out, fn, args), nprocs=world_size,
                           join=True, start_method="fork")
        return torch.load(out, weights_only=False)


__all__ = ["spawn", "free_port", "prewarm"]
