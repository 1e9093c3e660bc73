"""`megamoe plan --calibrate`: measure the planner's efficiency constants on this machine.

Measured here:
  dense_gemm     a square matmul (bf16 4096^3 on a GPU; fp32 1024^3 on a CPU) / peak
  grouped_max    torch._grouped_mm over 8 experts (rows 1024 each, H 2048, I 1024 on a GPU;
                 smaller on a CPU), divided by the grouped-GEMM shape factor of constants.py, so
                 that the planner's formula reproduces the measured efficiency at this shape
  alltoall_*     only under a launcher with several CUDA ranks (torchrun --nproc-per-node N -m
                 megamoe plan --calibrate): all_to_all_single of 64 MiB per rank, bytes sent per
                 second / the GPU's NVLink bandwidth. With one device there is nothing to measure
                 and the output says so.
The peak is the --gpu's (a GPU), or $MEGAMOE_PEAK_TFLOPS (any device, a CPU included); without a
peak on a CPU only the achieved TFLOP/s are reported, and no efficiency is written.
The JSON goes to stdout (and --calibration-out); `plan --calibration FILE` applies it.
"""

from __future__ import annotations

import os
import time

import torch

from megamoe.plan.constants import Efficiency, constants_for


def _timed(fn, iters: int, sync) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def _alltoall(device, hw, notes: list[str]) -> dict:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and device.type == "cuda"):
        notes.append("all-to-all bandwidth not measured: needs several CUDA ranks under torchrun")
        return {}
    n = dist.get_world_size()
    x = torch.empty(2 ** 25, dtype=torch.bfloat16, device=device)        # 64 MiB
    y = torch.empty_like(x)
    dt = _timed(lambda: dist.all_to_all_single(y, x), 10, torch.cuda.synchronize)
    sent = x.numel() * x.element_size() * (n - 1) / n
    bw = sent / dt
    notes.append(f"all-to-all over {n} ranks: {bw / 1e9:.1f} GB/s sent per rank")
    return {"alltoall_intra": min(1.0, bw / hw.intra_node_bytes_per_s)}


def calibrate(gpu: str = "h100") -> dict:
    c = constants_for(gpu)
    cuda = torch.cuda.is_available()
    if cuda and "LOCAL_RANK" in os.environ:
        import torch.distributed as dist
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        if not dist.is_initialized():
            dist.init_process_group("nccl")
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    notes = []
    peak = None
    if os.environ.get("MEGAMOE_PEAK_TFLOPS"):
        peak = float(os.environ["MEGAMOE_PEAK_TFLOPS"]) * 1e12
    elif cuda:
        peak = c.hardware.peak_flops
    n = 4096 if cuda else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    dense = 2 * n ** 3 / _timed(lambda: a @ b, 20 if cuda else 3, sync)
    measured = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
                "dense_tflops": round(dense / 1e12, 3)}
    eff: dict = {}
    if hasattr(torch, "_grouped_mm"):
        experts, rows, hidden, inter = (8, 1024, 2048, 1024) if cuda else (8, 128, 256, 128)
        x = torch.randn(experts * rows, hidden, device=device, dtype=dtype)
        w = torch.randn(experts, hidden, inter, device=device, dtype=dtype)
        offs = torch.arange(1, experts + 1, device=device, dtype=torch.int32) * rows
        grouped = 2 * experts * rows * hidden * inter / _timed(lambda: torch._grouped_mm(x, w, offs=offs),
                                                              20 if cuda else 3, sync)
        measured["grouped_tflops"] = round(grouped / 1e12, 3)
        if peak:
            e = Efficiency()
            shape = rows / (rows + e.grouped_rows_half) * inter / (inter + e.grouped_inter_half)
            eff["grouped_max"] = round(grouped / peak / shape, 4)
    if peak:
        eff["dense_gemm"] = round(dense / peak, 4)
        measured["peak_tflops"] = peak / 1e12
    else:
        notes.append("CPU without $MEGAMOE_PEAK_TFLOPS: GEMM TFLOP/s measured, no efficiency written")
    eff.update(_alltoall(device, c.hardware, notes))
    if not cuda:
        notes.append("no GPU: GEMM efficiency only (all-to-all needs GPUs)")
    return {"efficiency": eff, "hardware": {}, "measured": measured, "notes": notes}


__all__ = ["calibrate"]
