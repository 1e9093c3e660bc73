"""With torch.distributed initialised, only rank 0 builds the cached indices; others load them."""

import json
import multiprocessing as mp
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _worker(rank, world, tmp):
    sys.path.insert(0, HERE)
    import torch.distributed as dist

    from megamoe.config import DataConfig
    from megamoe.data import build_datasets

    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    logs = []
    cfg = DataConfig(paths=[os.path.join(tmp, "a"), os.path.join(tmp, "b")], weights=[1.0, 3.0],
                     cache_dir=os.path.join(tmp, "cache"))
    train, valid, _ = build_datasets(cfg, 16, 200, 20, seed=4, rank=rank, log=logs.append)
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"logs": logs, "first": [train[i].tolist() for i in range(5)]}, f)
    dist.barrier()
    dist.destroy_process_group()


def test_rank0_builds_others_load(tmp_path):
    from datautil import random_docs, write_dataset

    write_dataset(tmp_path / "a", random_docs(80, seed=1, max_len=100))
    write_dataset(tmp_path / "b", random_docs(50, seed=2, max_len=100))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    r0 = json.load(open(tmp_path / "rank0.json"))
    r1 = json.load(open(tmp_path / "rank1.json"))
    assert any("built" in m for m in r0["logs"]) and not any("built" in m for m in r1["logs"])
    assert r0["first"] == r1["first"]
    assert not any(".tmp" in f for f in os.listdir(tmp_path / "cache"))
    assert np.asarray(r0["first"]).shape == (5, 17)
