"""Readable collective timeouts: every collective runs inside `guarded(group)` (or
`named_collective(name)` where there is no group object yet, e.g. the startup rendezvous), so a
timeout says which process group (name and global ranks) was stuck and which limit applied,
instead of the backend's bare "Timed out waiting 600000ms for recv operation".

  guarded(group, timeout_s=None)      context: timeout -> CollectiveTimeout naming the group
  named_collective(name, timeout_s)   the same with a given name
  group_label(group) -> "'ep' (ranks 0,1)"; group_timeout_s(group) -> the group's timeout
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


class CollectiveTimeout(RuntimeError):
    """A collective or rendezvous did not complete within parallel.timeout_s."""


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text or type(err).__name__ in ("DistStoreError",)


def collective_timeout(group_name: str, timeout_s: float | None, err: BaseException) -> "CollectiveTimeout":
    """The CollectiveTimeout to raise (from `err`) for a timed-out collective on `group_name`."""
    limit = f" after {timeout_s:g} s (parallel.timeout_s)" if timeout_s else ""
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return CollectiveTimeout(
        f"collective on process group {group_name} timed out{limit}: some rank of that group "
        f"is stuck or died (check the other ranks' logs; raise parallel.timeout_s for slow "
        f"steps). Backend said: {first_line}")


def is_collective_timeout(err: BaseException) -> bool:
    return not isinstance(err, CollectiveTimeout) and _is_timeout(err)


@contextlib.contextmanager
def named_collective(group_name: str, timeout_s: float | None = None):
    """Re-raise a timeout inside the body as CollectiveTimeout naming `group_name`:

        with named_collective("'ep' (ranks 0,1)", cfg.parallel.timeout_s):
            dist.all_to_all_single(...)
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001 - backends raise RuntimeError / DistBackendError / ...
        if not is_collective_timeout(err):
            raise
        raise collective_timeout(group_name if group_name.startswith("'") else repr(group_name),
                                 timeout_s, err) from err


def group_label(group=None) -> str:
    """"'ep' (ranks 0,1)": the group's name (group_desc) and global ranks, for messages."""
    if group is None or group is dist.GroupMember.WORLD:
        return f"'world' ({dist.get_world_size() if dist.is_initialized() else 1} ranks)"
    name = getattr(group, "group_desc", "") or ""
    if name in ("", "undefined"):
        name = f"group {getattr(group, 'group_name', '?')}"
    try:
        ranks = ",".join(map(str, dist.get_process_group_ranks(group)))
    except (RuntimeError, ValueError):
        return f"{name!r}"
    return f"{name!r} (ranks {ranks})"


def group_timeout_s(group=None) -> float | None:
    """The collective timeout (seconds) `group` (default: the world) was created with."""
    pg = dist.GroupMember.WORLD if group is None else group
    for device in (torch.device("cpu"), torch.device("cuda")):
        try:
            return pg._get_backend(device).options._timeout.total_seconds()
        except (RuntimeError, AttributeError, ValueError):
            continue
    return None


@contextlib.contextmanager
def guarded(group=None, timeout_s: float | None = None):
    """Run collectives on `group`; a timeout becomes a CollectiveTimeout naming the group:

        with guarded(mesh.group("ep")):
            dist.all_to_all_single(out, inp, group=mesh.group("ep"))

    gloo's own error ("Timed out waiting 600000ms for recv operation") says neither which group
    nor which setting. With NCCL the watchdog usually ends the process first; its report names
    the group too, because new_group() sets group_desc. Costs nothing until an error: the label
    and the timeout are looked up only then."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - backends raise RuntimeError / DistBackendError / ...
        if not is_collective_timeout(err):
            raise
        raise collective_timeout(group_label(group), timeout_s or group_timeout_s(group), err) from err


__all__ = ["CollectiveTimeout", "collective_timeout", "is_collective_timeout", "named_collective",
           "group_label", "group_timeout_s", "guarded"]
