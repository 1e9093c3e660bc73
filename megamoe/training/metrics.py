"""Metrics: jsonl log file, console lines, throughput / MFU arithmetic, progress-bar policy.

Throughput is reported per device (`tflops_per_device`: one GPU, or one CPU process), and MFU
against that device's peak: the table below for known GPUs, or $MEGAMOE_PEAK_TFLOPS (TFLOP/s
per device) for any other device, a CPU included; without either, `mfu` is null.
"""

import json
import os
import sys
import time

import torch

# Dense (no sparsity) bf16 peak FLOP/s per device for MFU, from the vendors' data sheets.
# Matched as substrings of torch.cuda.get_device_name(), first match wins (specific names first).
PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
    ("H200", 989e12), ("H800", 989e12), ("GB200", 2500e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10G", 70e12),
    ("MI300X", 1307e12), ("MI250X", 383e12),
]
# Override (TFLOP/s per device), e.g. for a device not listed or to compute MFU on CPU;
# documented in the README ("Metrics").
PEAK_ENV = "MEGAMOE_PEAK_TFLOPS"


def device_peak_flops(device: torch.device, environ=None) -> float | None:
    """Peak dense bf16 FLOP/s of `device` for MFU: $MEGAMOE_PEAK_TFLOPS if set, else the table
    above for CUDA devices; None when unknown (MFU is then not reported)."""
    env = os.environ if environ is None else environ
    if env.get(PEAK_ENV):
        try:
            value = float(env[PEAK_ENV])
        except ValueError:
            raise ValueError(f"{PEAK_ENV} must be a number of TFLOP/s, got {env[PEAK_ENV]!r}") from None
        if value <= 0:
            raise ValueError(f"{PEAK_ENV} must be > 0, got {value}")
        return value * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS:
        if key in name:
            return value
    return None


def progress_bar_wanted(stdout=None, stderr=None) -> bool:
    """Whether a tqdm bar belongs on this console: only when both stdout (the log lines) and
    stderr (where tqdm draws) are terminals. In a file or a pipe (Slurm output, CI, `| tee`)
    each bar update would be one more carriage-return line; the plain log lines say it all."""
    for stream in (stdout or sys.stdout, stderr or sys.stderr):
        try:
            if not stream.isatty():
                return False
        except (AttributeError, ValueError):   # no isatty, or a closed stream
            return False
    return True


def host_rss_gib() -> float:
    """Resident memory of this process now (GiB); the CPU counterpart of max_mem_gib."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS instead (KiB on Linux/BSD)
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**30 if sys.platform == "darwin" else 2**20)


class JsonlLogger:
    """Appends one JSON object per line; only rank 0 writes."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def format_console(rec: dict) -> str:
    parts = [f"step {rec['step']}", f"loss {rec['loss']:.4f}", f"ce {rec['ce']:.4f}",
             f"lr {rec['lr']:.2e}", f"gnorm {rec['grad_norm']:.3f}", f"{rec['tokens_per_s']:.0f} tok/s"]
    if rec.get("tflops_per_device") is not None:
        parts.append(f"{rec['tflops_per_device']:.2f} TFLOP/s/device")
    if rec.get("mfu") is not None:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    if rec.get("lb_loss") is not None:
        parts.append(f"lb {rec['lb_loss']:.3f} z {rec['z_loss']:.3f}")
    if rec.get("expert_load_cv") is not None:
        parts.append(f"load-cv {rec['expert_load_cv']:.2f}")
    if rec.get("max_mem_gib") is not None:
        parts.append(f"mem {rec['max_mem_gib']:.1f} GiB")
    if rec.get("val_loss") is not None:
        parts.append(f"val loss {rec['val_loss']:.4f}")
    return " | ".join(parts)
