"""Process launch: find rank / world size / master address, start torch.distributed.

Supported launchers (checked in this order):
  torchrun (or any launcher setting RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
  Slurm srun, one task per GPU: RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS
      (else SLURM_NTASKS), LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = $MASTER_ADDR or the first
      host of the step's / job's node list (`scontrol show hostnames`, else parsed here),
      MASTER_PORT = $MASTER_PORT or a port derived from SLURM_JOB_ID (same on every task of
      the job, and again after a requeue). Only inside a job step (SLURM_STEP_ID set, i.e.
      under srun): the batch shell itself has SLURM_PROCID=0 and SLURM_NTASKS=N too, and a
      python started there without srun is one process, not rank 0 of N.
  nothing set: a single process (rank 0 of 1)

Functions (for scripts and tests building on this):
  detect_env(environ=None) -> DistEnv        rank, world_size, local_rank, master_addr/port, launcher
  first_host(nodelist) -> str               first host of a Slurm node list (scontrol or parse)
  parse_first_host(nodelist) -> str         the parser alone: "gpu[003-005,007],cpu1" -> "gpu003",
                                            "rack[1-2]-n[01-04]" -> "rack1-n01"
  port_from_job_id(job_id) -> int           deterministic port in [15000, 35000)
  resolve_backend(name) -> "nccl" | "gloo"  "auto": nccl when CUDA is available, else gloo
  init_distributed(pcfg, environ=None) -> DistEnv   init_process_group (no-op if already done)
  device_for(env, backend) -> torch.device  cuda:LOCAL_RANK for nccl (and selects it), else cpu
  shutdown_distributed()                    barrier + destroy_process_group

Timeouts (parallel.timeout_s applies to every group, not only the world):
  new_group(ranks, name, timeout_s) -> group  dist.new_group with timeout and group_desc=name
                                            (NCCL's watchdog prints the name in its timeout
                                            reports; megamoe.parallel.guard names it on errors)
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.parallel.guard import guarded, named_collective


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"      # torchrun | slurm | single


def parse_first_host(nodelist: str) -> str:
    """First host of a Slurm node list without calling scontrol.

    "node1,node2" -> "node1"; "gpu[003-005,007]" -> "gpu003"; "a[1-2]-ib,b" -> "a1-ib";
    "rack[1-2]-n[01-04]" -> "rack1-n01" (Slurm expands every bracket; the first host takes the
    first value of each, zero padding kept).
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty Slurm node list")
    # The first entry ends at the first comma outside brackets.
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if depth < 0 or depth > 1:
            raise ValueError(f"malformed Slurm node list {nodelist!r}")
        if ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end]
    if entry.count("[") != entry.count("]"):
        raise ValueError(f"malformed Slurm node list {nodelist!r}")
    first = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0].strip(), entry)
    if not first:
        raise ValueError(f"malformed Slurm node list {nodelist!r}")
    return first


def first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return parse_first_host(nodelist)


def port_from_job_id(job_id: str | int) -> int:
    return 15000 + int(job_id) % 20000


def detect_env(environ=None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                       local_rank=int(env.get("LOCAL_RANK", 0)),
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")
    # Inside an srun step only (SLURM_STEP_ID): see the module docstring.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
        nodelist = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                    or env.get("SLURM_NODELIST") or "")
        addr = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        else:
            port = port_from_job_id(env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0")
        return DistEnv(rank=int(env["SLURM_PROCID"]), world_size=int(world),
                       local_rank=int(env.get("SLURM_LOCALID", 0)), master_addr=addr,
                       master_port=port, launcher="slurm")
    return DistEnv()


def resolve_backend(name: str = "auto") -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if name not in ("nccl", "gloo"):
        raise ValueError(f"parallel.backend must be auto, nccl or gloo, got {name!r}")
    if name == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend nccl needs CUDA; use gloo (or auto) on CPU")
    return name


def device_for(env: DistEnv, backend: str) -> torch.device:
    if backend == "nccl":
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(pcfg, environ=None) -> DistEnv:
    """Start the default process group from the launcher's environment (idempotent)."""
    if dist.is_initialized():
        # Under srun only SLURM_LOCALID says the local rank (no LOCAL_RANK): ask detect_env.
        return DistEnv(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=detect_env(environ).local_rank, launcher="existing")
    env = detect_env(environ)
    backend = resolve_backend(pcfg.backend)
    # init_method env:// reads these; Slurm does not set them itself.
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.master_addr, str(env.master_port)
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = device_for(env, backend)
    # A rank that never shows up makes the rendezvous time out after parallel.timeout_s.
    with named_collective(f"world (startup rendezvous at {env.master_addr}:{env.master_port}, "
                          f"{env.world_size} ranks)", pcfg.timeout_s):
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                timeout=datetime.timedelta(seconds=pcfg.timeout_s), **kwargs)
    return env


def shutdown_distributed() -> None:
    if dist.is_initialized():
        with guarded():
            dist.barrier()
        dist.destroy_process_group()


# ------------------------------------------------------------------ timeouts and fault messages

def new_group(ranks: list[int], name: str, timeout_s: float | None = None):
    """dist.new_group(ranks) named `name` (group_desc) with the given timeout.

    Without an explicit timeout torch gives a new group the backend default (30 min for gloo,
    10 min for NCCL), not the world group's parallel.timeout_s. Every rank must call this for
    every group, in the same order (a torch.distributed rule)."""
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    return dist.new_group(ranks, timeout=timeout, group_desc=name)


__all__ = ["DistEnv", "detect_env", "first_host", "parse_first_host", "port_from_job_id",
           "resolve_backend", "device_for", "init_distributed", "shutdown_distributed", "new_group"]
