"""On-disk cache of dataset index arrays (.npy), keyed by a hash of what they depend on.

Callers key the arrays by the *content* they are built from (digests of the sequence lengths and
document ids, not file names or sizes), and pass a validator: arrays that are unreadable or fail
it (a stale or foreign file, a truncated write by another tool) are rebuilt with a warning,
never used.

With torch.distributed initialised, rank 0 builds missing arrays while the other ranks wait at
a barrier and then load them (they build them themselves only if they still cannot see the
files, e.g. a node-local cache dir). Every file is written to a temporary name and renamed, so
a reader never sees a half-written array; builds are deterministic, so concurrent writers
produce identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Callable

import numpy as np


def config_hash(desc: dict) -> str:
    """Short stable hash of a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def array_digest(arr: np.ndarray) -> str:
    """Hash of an integer array's values (dtype-independent)."""
    return hashlib.sha256(np.ascontiguousarray(arr, dtype=np.int64).tobytes()).hexdigest()[:16]


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, or (0, 1) when it is not initialised."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    rank, world = dist_rank_world()
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def save_npy_atomic(path: str, arr: np.ndarray) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cached_arrays(cache_dir: str | None, stem: str, desc: dict, names: list[str],
                  build: Callable[[], dict], log=None,
                  validate: Callable[[dict], str | None] | None = None) -> dict:
    """Load arrays ``names`` for `desc` from cache_dir, building (and saving) them if missing.

    cache_dir None -> build in memory, no files. Files: ``<cache_dir>/<stem>-<hash>-<name>.npy``
    plus a ``.json`` with `desc` for humans. Returns {name: array} (memory-mapped when cached).
    validate(arrays) -> None if the loaded arrays are usable, else why not: they are then
    rebuilt, saved over the bad files, and a warning is logged (or warnings.warn without log).
    """
    if not cache_dir:
        return build()
    key = config_hash(desc)
    base = os.path.join(cache_dir, f"{stem}-{key}")
    paths = {n: f"{base}-{n}.npy" for n in names}

    def have() -> bool:
        return all(os.path.isfile(p) for p in paths.values())

    def load() -> tuple[dict | None, str | None]:
        try:
            arrays = {n: np.load(paths[n], mmap_mode="r", allow_pickle=False) for n in names}
        except (OSError, ValueError) as err:  # truncated or not an .npy file
            return None, f"unreadable ({err})"
        why = validate(arrays) if validate is not None else None
        return (None, why) if why else (arrays, None)

    def warn(why: str) -> None:
        msg = f"warning: cached {stem} indices {base}-*.npy do not fit the data ({why}); rebuilding"
        if log:
            log(msg)
        else:
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def build_and_save() -> None:
        os.makedirs(cache_dir, exist_ok=True)
        arrays = build()
        for n in names:
            save_npy_atomic(paths[n], arrays[n])
        tmp = f"{base}.json.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(desc, f, indent=1, sort_keys=True)
        os.replace(tmp, f"{base}.json")
        if log:
            log(f"built {stem} indices -> {base}-*.npy")

    rank, world = dist_rank_world()
    if world > 1:
        if rank == 0:
            try:
                arrays, why = load() if have() else (None, None)
                if arrays is None:
                    if why:
                        warn(why)
                    build_and_save()
            except BaseException:
                barrier()  # release the waiting ranks; they hit the same error and raise it
                raise
        barrier()
    if have():
        arrays, why = load()
        if arrays is not None:
            return arrays
        warn(why)
    build_and_save()
    arrays, why = load()
    if arrays is None:  # a freshly built array failing its own check is a bug, not a stale cache
        raise RuntimeError(f"{stem} indices built for {desc} fail validation: {why}")
    return arrays
