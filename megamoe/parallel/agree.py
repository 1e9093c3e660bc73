"""Rank agreement at startup: all-gather short fingerprints (config, dataset) and fail with one
line naming the ranks that differ: a rank with another config or other data would otherwise
train silently wrong or hang in a mismatched collective. Also the max-over-ranks vote used to
agree on stopping (signals).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
import torch.distributed as dist

from megamoe.parallel.guard import group_label, guarded, named_collective


def fingerprint(obj) -> str:
    """Short stable hash of a JSON-able object (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def config_fingerprint(cfg) -> dict[str, str]:
    """{"model.d_model": "128", ...}: every field, so a mismatch can name the fields that differ."""
    from megamoe.config import to_dict

    def flatten(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", json.dumps(value)
    return dict(flatten(to_dict(cfg)))


def dataset_fingerprint(dataset, probes: int = 4) -> str:
    """Length + the tokens of a few samples spread over the dataset. Cheap (reads `probes`
    samples) and catches another corpus, split, seed, sequence length or shuffle."""
    if dataset is None:
        return "none"
    n = len(dataset)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({int(i) for i in np.linspace(0, max(n - 1, 0), num=min(probes, n))}) if n else []:
        h.update(np.ascontiguousarray(np.asarray(dataset[i], dtype=np.int64)).tobytes())
    return h.hexdigest()[:12]


def _field_diff(a: dict, b: dict, limit: int = 3) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = ", ".join(f"{k}={b.get(k, 'missing')} vs {a.get(k, 'missing')}" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def disagreement(values: list[dict]) -> str | None:
    """One line naming what differs between ranks, or None. values[r] = {what: fingerprint}, a
    fingerprint being a hash string or a dict of fields (then the differing fields are named)."""
    problems = []
    for what in values[0]:
        groups: dict[str, list[int]] = {}
        for rank, v in enumerate(values):
            groups.setdefault(fingerprint(v.get(what, "missing")), []).append(rank)
        if len(groups) == 1:
            continue
        # Name the minority: ranks that differ from what most ranks (ties: rank 0) have.
        ref_hash, ref_ranks = max(groups.items(), key=lambda kv: (len(kv[1]), 0 in kv[1]))
        odd = sorted(r for h, ranks in groups.items() if h != ref_hash for r in ranks)
        ref_value, odd_value = values[ref_ranks[0]].get(what), values[odd[0]].get(what)
        if isinstance(ref_value, dict) and isinstance(odd_value, dict):
            detail = _field_diff(ref_value, odd_value)
        else:
            detail = f"{odd_value} vs {ref_value}"
        problems.append(f"{what} differs on rank{'s' if len(odd) > 1 else ''} {','.join(map(str, odd))} "
                        f"({detail} on rank {ref_ranks[0]})")
    return "; ".join(problems) if problems else None


def check_ranks_agree(fingerprints: dict, group=None, timeout_s: float | None = None) -> None:
    """All-gather `fingerprints` ({"config": ..., "train data": ...}) over `group` (default: the
    world) and raise ValueError with one line if any rank differs. No-op without distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group)
    gathered: list = [None] * world
    with named_collective(group_label(group), timeout_s):
        dist.all_gather_object(gathered, fingerprints, group=group)
    problem = disagreement(gathered)
    if problem:
        raise ValueError(f"ranks disagree at startup: {problem}; launch every rank with the same "
                         f"config, overrides and data")


def max_over_ranks(value: int, device=None) -> int:
    """The largest `value` over all ranks (the value itself without distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    with guarded():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def check_config_agrees(cfg, group=None, timeout_s: float | None = None) -> None:
    """All ranks must train the same config: all-gather a fingerprint of every field and raise
    ValueError naming the differing fields (e.g. "config differs on rank 1 (model.d_model=256
    vs 128 on rank 0)"). No-op without torch.distributed."""
    check_ranks_agree({"config": config_fingerprint(cfg)}, group=group,
                      timeout_s=timeout_s or cfg.parallel.timeout_s)


__all__ = ["fingerprint", "config_fingerprint", "dataset_fingerprint", "disagreement", "check_ranks_agree",
           "max_over_ranks", "check_config_agrees"]
