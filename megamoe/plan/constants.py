"""Every hardware and efficiency constant of the planner, in one place.

Nothing else in megamoe/plan holds a number that describes hardware or kernel efficiency: the
memory and time models take a `Hardware` and `Efficiency` and nothing more. `--calibrate`
measures some of them on the local devices and writes a JSON file of overrides;
`plan --calibration FILE` (or `--peak-tflops`, `--intra-node-gbps`, ...) replaces them.

Sources (data sheets, dense bf16, no sparsity):
  h100  SXM5: 989 TFLOP/s, HBM3 3.35 TB/s, NVLink 4 450 GB/s per direction, 8 x 400 Gb/s
        ConnectX-7 per node (50 GB/s per GPU)
  h200  SXM: the H100 die with 141 GB HBM3e at 4.8 TB/s; same links
  a100  SXM4 80 GB: 312 TFLOP/s, 2.04 TB/s, NVLink 3 300 GB/s per direction, 200 Gb/s HDR
        per GPU (25 GB/s)
  b200  HGX: 2250 TFLOP/s, 8 TB/s, NVLink 5 900 GB/s per direction, 400 Gb/s per GPU
Efficiencies are anchored on measurements in /work/shared/DESIGN.md ("Measured anchors", H100,
bf16): dense GEMM 782 TFLOP/s (0.79 of peak); naive sort + torch._grouped_mm MoE layer 291
TFLOP/s at the OLMoE shape (I 1024, 2048 rows per expert) and 512 at the Mixtral shape
(I 14336, 2048 rows per expert). They are a model (see megamoe/plan/timing.py), to be replaced
by `--calibrate` on the target machine.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float            # dense bf16 FLOP/s per GPU
    memory_gib: float            # HBM per GPU (what the allocator can hand out, minus nothing)
    hbm_bytes_per_s: float       # memory bandwidth (optimizer step, memory-bound kernels)
    intra_node_bytes_per_s: float   # NVLink, per GPU per direction
    inter_node_bytes_per_s: float   # network, per GPU per direction


GPUS: dict[str, Hardware] = {
    "h100": Hardware("h100", 989e12, 80.0, 3.35e12, 450e9, 50e9),
    "h200": Hardware("h200", 989e12, 141.0, 4.8e12, 450e9, 50e9),
    "a100": Hardware("a100", 312e12, 80.0, 2.04e12, 300e9, 25e9),
    "b200": Hardware("b200", 2250e12, 180.0, 8.0e12, 900e9, 50e9),
}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak a kernel / collective class reaches (see timing.py for how each is used)."""
    dense_gemm: float = 0.79          # 782 / 989 (DESIGN.md anchor, large bf16 GEMM on H100)
    # Grouped expert GEMM: grouped_max * rows/(rows + grouped_rows_half) * I/(I + grouped_inter_half),
    # rows = token slots per local expert per micro-batch, I = expert hidden per etp shard.
    # Fitted to the two anchors (0.294 at OLMoE's shape, 0.518 at Mixtral's): gives 0.277 / 0.518.
    grouped_max: float = 0.624
    grouped_rows_half: float = 256.0
    grouped_inter_half: float = 1024.0
    attention_core: float = 0.45      # flash attention fwd+bwd (QK^T, PV), a model
    # Collectives: achieved bus bandwidth / link bandwidth, and a fixed latency per call.
    ring_intra: float = 0.80          # all-reduce / all-gather / reduce-scatter on NVLink
    ring_inter: float = 0.80          # ... across nodes
    alltoall_intra: float = 0.60      # all-to-all with split sizes on NVLink
    alltoall_inter: float = 0.70      # ... across nodes (bound by the NICs)
    latency_intra_s: float = 20e-6
    latency_inter_s: float = 40e-6
    p2p_latency_s: float = 20e-6      # pipeline send/recv
    optimizer_hbm: float = 0.70       # fraction of HBM bandwidth of the AdamW / ZeRO update


@dataclass(frozen=True)
class MemoryConstants:
    """Memory that is not a tensor of the model, per GPU."""
    framework_gib: float = 1.5        # CUDA context, cuBLAS / NCCL workspaces
    fragmentation: float = 0.05       # allocator slack, fraction of the tensors' bytes
    usable_fraction: float = 0.97     # of the nominal HBM the caching allocator can use


@dataclass(frozen=True)
class Constants:
    hardware: Hardware
    efficiency: Efficiency = Efficiency()
    memory: MemoryConstants = MemoryConstants()
    source: str = "defaults"          # "defaults" or the calibration file / overrides applied

    def with_overrides(self, **hw) -> "Constants":
        """Hardware fields replaced where a value is given (None: keep)."""
        given = {k: v for k, v in hw.items() if v is not None}
        if not given:
            return self
        return dataclasses.replace(self, hardware=dataclasses.replace(self.hardware, **given),
                                   source=f"{self.source} + overrides {sorted(given)}")


def constants_for(gpu: str) -> Constants:
    if gpu not in GPUS:
        raise ValueError(f"unknown --gpu {gpu!r}; choose one of {', '.join(GPUS)} "
                         "(or override --peak-tflops, --gpu-memory-gib and the bandwidths)")
    return Constants(GPUS[gpu])


def load_calibration(consts: Constants, path: str) -> Constants:
    """Apply a JSON file written by `plan --calibrate`: {"efficiency": {...}, "hardware": {...}}."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"calibration file {path!r} not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration file {path!r} is not JSON: {err}") from None
    eff_fields = {f.name for f in dataclasses.fields(Efficiency)}
    hw_fields = {f.name for f in dataclasses.fields(Hardware)} - {"name"}
    eff = {k: float(v) for k, v in (data.get("efficiency") or {}).items() if k in eff_fields}
    hw = {k: float(v) for k, v in (data.get("hardware") or {}).items() if k in hw_fields}
    unknown = set(data.get("efficiency") or {}) - eff_fields | (set(data.get("hardware") or {}) - hw_fields)
    if unknown:
        raise ValueError(f"calibration file {path!r} has unknown keys {sorted(unknown)}")
    return dataclasses.replace(consts, efficiency=dataclasses.replace(consts.efficiency, **eff),
                               hardware=dataclasses.replace(consts.hardware, **hw),
                               source=f"calibration {path}")


__all__ = ["GIB", "Hardware", "Efficiency", "MemoryConstants", "Constants", "GPUS", "constants_for",
           "load_calibration"]
