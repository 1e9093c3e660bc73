"""Which checkpoint: the one resolver from a path (a checkpoint directory or an out_dir) to a
checkpoint directory, and the newest complete checkpoint of an out_dir.

"Complete" means published with its COMPLETE marker (files.py). The `latest` text file next
to the checkpoints is kept for humans and tools but is never trusted: a writer killed between
publishing a checkpoint and rewriting `latest` must not make the next run resume from an older
one. Checkpoints written before the marker existed count when they hold their files.
"""

from __future__ import annotations

import os

from megamoe.checkpoint.files import LATEST, MARKER

CKPT_DIR = "checkpoints"
_FORMAT_FILES = ("model.pt", "metadata.json", "model_rank0.pt")


def checkpoints_root(out_dir: str) -> str:
    return os.path.join(out_dir, CKPT_DIR)


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def is_checkpoint_dir(path: str) -> bool:
    """A directory holding a checkpoint of either format (complete or not)."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in (MARKER, *_FORMAT_FILES))


def is_complete(path: str) -> bool:
    if os.path.isfile(os.path.join(path, MARKER)):
        return True
    # written before the marker existed: published by rename only once complete
    return (os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isfile(os.path.join(path, "trainer.pt"))
            and any(os.path.isfile(os.path.join(path, f)) for f in _FORMAT_FILES))


def list_checkpoints(out_dir: str) -> list[str]:
    """Names of the complete checkpoints of an out_dir, oldest first."""
    root = checkpoints_root(out_dir)
    if not os.path.isdir(root):
        return []
    names = [d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit()]
    return sorted((d for d in names if is_complete(os.path.join(root, d))), key=lambda d: int(d[5:]))


def newest_checkpoint(out_dir: str) -> str | None:
    """Path of the newest complete checkpoint of an out_dir, or None."""
    names = list_checkpoints(out_dir)
    return os.path.join(checkpoints_root(out_dir), names[-1]) if names else None


def previous_checkpoint(ckpt_dir: str) -> str | None:
    """The newest complete checkpoint older than `ckpt_dir` in the same out_dir, or None."""
    root, name = os.path.split(os.path.abspath(ckpt_dir))
    older = [n for n in list_checkpoints(os.path.dirname(root)) if n < name]
    return os.path.join(root, older[-1]) if older else None


def find_checkpoint(path: str) -> str:
    """`path` if it is a checkpoint directory, else the newest complete checkpoint of the
    out_dir `path`. ValueError (one line) when it is neither."""
    if not os.path.exists(path):
        raise ValueError(f"{path!r} does not exist")
    if is_checkpoint_dir(path):
        return path
    newest = newest_checkpoint(path) if os.path.isdir(path) else None
    if newest is None:
        raise ValueError(f"{path!r} is neither a megamoe checkpoint directory nor an out_dir with checkpoints")
    return newest


__all__ = ["CKPT_DIR", "LATEST", "checkpoints_root", "step_name", "is_checkpoint_dir", "is_complete",
           "list_checkpoints", "newest_checkpoint", "previous_checkpoint", "find_checkpoint"]
