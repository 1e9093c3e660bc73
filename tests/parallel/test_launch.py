"""Launch environment detection (torchrun / Slurm / single), Slurm node lists, collective
timeouts that name the stuck group, and the startup check that all ranks got the same config.

The distributed checks run in one spawn of 2 forked gloo processes started through
megamoe.parallel.launch.init_distributed (the path `megamoe train` takes).
"""

from __future__ import annotations

import inspect
import os
import shutil
import socket
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megamoe.config import ParallelConfig, preset
from megamoe.parallel import agree, guard, launch
from megamoe.parallel.launch import DistEnv, detect_env, parse_first_host, port_from_job_id

NODELISTS = [
    ("node1", "node1"),
    ("node1,node2", "node1"),
    ("node[01-03,07]", "node01"),
    ("node[07,01-03]", "node07"),       # Slurm keeps the written order
    ("gpu[003-005,007],cpu1", "gpu003"),
    ("cpu1,gpu[003-005]", "cpu1"),
    ("a[1-2]-ib,b", "a1-ib"),
    ("rack[1-2]-n[01-04]", "rack1-n01"),
    ("x[9]", "x9"),
    (" n[10-11] ", "n10"),
]


# ----------------------------------------------------------------------------- node lists

@pytest.mark.parametrize("nodelist,first", NODELISTS)
def test_parse_first_host(nodelist, first):
    assert parse_first_host(nodelist) == first


@pytest.mark.parametrize("bad", ["", "node[01-03", "node]1[", "n[[1]]"])
def test_parse_first_host_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse_first_host(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
def test_parser_agrees_with_scontrol():
    compared = 0
    for nodelist, first in NODELISTS:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist.strip()], capture_output=True,
                             text=True, timeout=30)
        hosts = out.stdout.split()
        if out.returncode == 0 and hosts and "Invalid" not in out.stdout + out.stderr:
            assert hosts[0] == first, nodelist       # (older Slurm rejects suffixes like a[1-2]-ib)
            compared += 1
        assert launch.first_host(nodelist.strip()) == first   # scontrol, or the parser as fallback
    assert compared >= 5


# ------------------------------------------------------------------------- env detection

def test_single_process_without_launcher():
    assert detect_env({}) == DistEnv(rank=0, world_size=1, local_rank=0, launcher="single")


def test_torchrun_env():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node07",
           "MASTER_PORT": "23456", "LOCAL_WORLD_SIZE": "4"}
    assert detect_env(env) == DistEnv(5, 8, 1, "node07", 23456, "torchrun")


def test_torchrun_under_srun_wins_over_slurm_vars():
    # One torchrun per node under srun: Slurm vars describe the node task, torchrun's the worker.
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "77"}
    got = detect_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.launcher) == (3, 4, 1, "torchrun")


def slurm_env(**extra):
    env = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_LOCALID": "2", "SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_NODELIST": "node[01-03,07]",
           "SLURM_JOB_ID": "4242"}
    env.update(extra)
    return env


def test_slurm_env_compressed_nodelist():
    got = detect_env(slurm_env())
    assert got == DistEnv(rank=6, world_size=8, local_rank=2, master_addr="node01",
                          master_port=port_from_job_id(4242), launcher="slurm")
    assert got.master_port == 15000 + 4242


def test_slurm_env_step_values_and_explicit_master():
    # A step using part of the job: its own task count and node list; MASTER_* from the script win.
    got = detect_env(slurm_env(SLURM_STEP_NUM_TASKS="4", SLURM_STEP_NODELIST="node[03,07]"))
    assert (got.world_size, got.master_addr) == (4, "node03")
    got = detect_env(slurm_env(MASTER_ADDR="10.0.0.9", MASTER_PORT="2999"))
    assert (got.master_addr, got.master_port) == ("10.0.0.9", 2999)
    # Only SLURM_NODELIST (older Slurm), no step task count: fall back to SLURM_NTASKS.
    env = slurm_env(SLURM_NODELIST="gpu[12-13]")
    del env["SLURM_JOB_NODELIST"], env["SLURM_STEP_NUM_TASKS"]
    got = detect_env(env)
    assert (got.world_size, got.master_addr) == (8, "gpu12")


def test_batch_shell_without_srun_is_one_process():
    # sbatch's batch shell has SLURM_PROCID=0 and SLURM_NTASKS=N but no step: python started
    # there directly is a single process, not rank 0 of N waiting forever for N-1 others.
    env = slurm_env(SLURM_PROCID="0", SLURM_LOCALID="0")
    del env["SLURM_STEP_ID"], env["SLURM_STEP_NUM_TASKS"]
    assert detect_env(env).world_size == 1 and detect_env(env).launcher == "single"


def test_port_from_job_id_is_stable_and_in_range():
    ports = {port_from_job_id(j) for j in (0, 1, 19999, 20000, 123456789)}
    assert all(15000 <= p < 35000 for p in ports)
    assert port_from_job_id("4242") == port_from_job_id(4242)   # same after a requeue (same id)


def test_resolve_backend():
    assert launch.resolve_backend("gloo") == "gloo"
    assert launch.resolve_backend("auto") == ("nccl" if torch.cuda.is_available() else "gloo")
    with pytest.raises(ValueError, match="auto, nccl or gloo"):
        launch.resolve_backend("mpi")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            launch.resolve_backend("nccl")


# ------------------------------------------------------------------- distributed (2 x gloo)

TIMEOUT_S = 7        # the configured parallel.timeout_s of the spawned world
STUCK_TIMEOUT_S = 2  # the group used to provoke a timeout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(d_model=64):
    cfg = preset("tiny")
    cfg.model.d_model = d_model
    cfg.parallel.timeout_s = TIMEOUT_S
    return cfg


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    res = {}
    env = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    got = launch.init_distributed(ParallelConfig(backend="gloo", timeout_s=TIMEOUT_S), environ=env)
    res["env"] = (got.rank, got.world_size, got.launcher, dist.get_rank(), dist.get_world_size())
    res["world_timeout"] = guard.group_timeout_s()
    g = launch.new_group([0, 1], "ep", timeout_s=5)
    res["group_timeout"] = guard.group_timeout_s(g)
    res["group_label"] = guard.group_label(g)
    with guard.guarded(g):                       # a working collective passes through
        t = torch.ones(1)
        dist.all_reduce(t, group=g)
        res["sum"] = float(t)

    # Same config: no error. Another d_model on rank 1: both ranks get the same ValueError.
    agree.check_config_agrees(_cfg())
    try:
        agree.check_config_agrees(_cfg(d_model=64 if rank == 0 else 96))
        res["config_error"] = None
    except ValueError as err:
        res["config_error"] = str(err)
    from megamoe.parallel.agree import check_ranks_agree, dataset_fingerprint
    data = [[1, 2, 3], [4, 5, 6]] if rank == 0 else [[1, 2, 3], [4, 5, 7]]
    try:
        check_ranks_agree({"train data": dataset_fingerprint(data)})
        res["data_error"] = None
    except ValueError as err:
        res["data_error"] = str(err)

    # Last: a collective that rank 1 never joins. Rank 0 must fail after STUCK_TIMEOUT_S with
    # an error naming the group and the setting.
    stuck = launch.new_group([0, 1], "expert-parallel (ep)", timeout_s=STUCK_TIMEOUT_S)
    dist.barrier()
    done = os.path.join(out_dir, "rank0.pt")
    if rank == 0:
        t0 = time.monotonic()
        try:
            with guard.guarded(stuck):
                dist.all_reduce(torch.ones(1), group=stuck)
            res["stuck"] = None
        except Exception as err:  # noqa: BLE001
            res["stuck"] = (type(err).__name__, str(err), time.monotonic() - t0)
        torch.save(res, done + ".tmp")
        os.replace(done + ".tmp", done)
    else:
        # Stay alive (not in the collective) until rank 0 has timed out: an exiting peer would
        # end rank 0's wait with "connection closed" instead.
        deadline = time.monotonic() + 60
        while not os.path.exists(done) and time.monotonic() < deadline:
            time.sleep(0.1)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=2, join=True, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_init_from_torchrun_env_and_configured_timeouts(dist_results):
    for rank, res in enumerate(dist_results):
        assert res["env"] == (rank, 2, "torchrun", rank, 2)
        assert res["world_timeout"] == TIMEOUT_S          # parallel.timeout_s reached the backend
        assert res["group_timeout"] == 5
        assert res["group_label"] == "'ep' (ranks 0,1)"
        assert res["sum"] == 2.0


def test_ranks_with_different_config_fail_naming_the_field(dist_results):
    for res in dist_results:
        msg = res["config_error"]
        assert msg is not None and "\n" not in msg
        assert "config differs on rank 1" in msg and "model.d_model=96 vs 64 on rank 0" in msg, msg
        assert dist_results[0]["config_error"] == dist_results[1]["config_error"]


def test_ranks_with_different_data_fail(dist_results):
    for res in dist_results:
        assert res["data_error"] is not None and "train data differs on rank 1" in res["data_error"]


def test_stuck_collective_names_group_and_timeout(dist_results):
    name, msg, elapsed = dist_results[0]["stuck"]
    assert name == "CollectiveTimeout"
    assert "'expert-parallel (ep)' (ranks 0,1)" in msg, msg
    assert f"timed out after {STUCK_TIMEOUT_S} s (parallel.timeout_s)" in msg, msg
    assert STUCK_TIMEOUT_S - 0.5 < elapsed < STUCK_TIMEOUT_S + 30


def _mesh_worker(rank, port, out_dir):
    from megamoe.parallel.mesh import ParallelMesh, make_layout
    torch.set_num_threads(1)
    env = {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    launch.init_distributed(ParallelConfig(backend="gloo", timeout_s=TIMEOUT_S), environ=env)
    mesh = ParallelMesh(make_layout(2, 1, 1, 2, 2, 1), rank, timeout_s=TIMEOUT_S)
    res = {name: (guard.group_timeout_s(mesh.group(name)), guard.group_label(mesh.group(name)))
           for name in ("dp", "ep", "tp")}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()


@pytest.mark.skipif("timeout_s" not in inspect.signature(
    __import__("megamoe.parallel.mesh", fromlist=["ParallelMesh"]).ParallelMesh).parameters,
    reason="ParallelMesh does not take parallel.timeout_s for its groups yet")
def test_mesh_groups_get_timeout_and_names(tmp_path):
    mp.start_processes(_mesh_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    res = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert res["dp"] == (TIMEOUT_S, "'dp' (ranks 0,1)")
    assert res["ep"] == (TIMEOUT_S, "'ep' (ranks 0,1)")
    assert res["tp"] == (TIMEOUT_S, "'tp' (ranks 0)")


def _lonely_rank(rank, port, out_dir):
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.monotonic()
    try:
        launch.init_distributed(ParallelConfig(backend="gloo", timeout_s=2), environ=env)
        res = None
    except Exception as err:  # noqa: BLE001
        res = (type(err).__name__, str(err), time.monotonic() - t0)
    torch.save(res, os.path.join(out_dir, "lonely.pt"))


def test_rank_that_never_joins_fails_the_rendezvous_clearly(tmp_path):
    port = _free_port()
    mp.start_processes(_lonely_rank, args=(port, str(tmp_path)), nprocs=1, join=True, start_method="fork")
    name, msg, elapsed = torch.load(tmp_path / "lonely.pt", weights_only=False)
    assert name == "CollectiveTimeout" and "\n" not in msg
    assert f"'world (startup rendezvous at 127.0.0.1:{port}, 2 ranks)'" in msg, msg
    assert "timed out after 2 s (parallel.timeout_s)" in msg and elapsed < 30
