"""Files and directories of checkpoints: the one atomic writer, publishing with a completeness
marker, and reading with one-line errors.

A directory is written under a temporary hidden sibling name and renamed into place when it is
finished (`begin` / `commit`, or `atomic_dir`). Replacing an existing directory renames the old
one aside first and removes it only after the new one has its name: a valid name never points
at a half-deleted directory. A checkpoint directory additionally gets `COMPLETE` (JSON: the step
and every file's size) written last, just before the rename; resume trusts only directories
with it, and loading checks the sizes first, so a truncated file is named in one line before
anything is read.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from typing import Iterator

import torch
import yaml

MARKER = "COMPLETE"
LATEST = "latest"     # text file naming the newest checkpoint, for humans and tools only


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or unreadable (one line naming the file)."""


class WriteError(ValueError, OSError):
    """A file could not be written (disk full, quota, permissions): one line naming it. An
    OSError too, so callers that handled the raw error keep working."""


def _write_errors() -> tuple[type, ...]:
    # torch.save reports ENOSPC as RuntimeError ("PytorchStreamWriter failed writing file"),
    # safetensors as SafetensorError: neither is an OSError.
    errors: tuple[type, ...] = (OSError, RuntimeError)
    try:
        from safetensors import SafetensorError
        errors += (SafetensorError,)
    except ImportError:
        pass
    return errors


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Around the code that writes `path`: a failed write becomes a WriteError naming the file
    (only write errors: the block should hold nothing but the write)."""
    try:
        yield
    except WriteError:
        raise
    except _write_errors() as err:
        text = str(err).strip()
        reason = getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)
        raise WriteError(f"cannot write {path}: {reason}") from None


# ------------------------------------------------------------------------ the atomic writer

def _aside_name(path: str, what: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.{what}-{os.getpid()}")


def begin(dst: str, private: bool = False) -> str:
    """A new temporary directory next to `dst` (hidden, so no reader takes it for a result).
    With normal permissions unless `private`."""
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    if not private:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it private
    return tmp


def commit(tmp: str, dst: str, marker: dict | None = None) -> str:
    """Rename the finished `tmp` to `dst` (replacing an existing `dst`: renamed aside first, then
    removed). With `marker`, COMPLETE is written into tmp first, listing every file's size."""
    if marker is not None:
        sizes = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        _write_text(os.path.join(tmp, MARKER), json.dumps({**marker, "files": sizes}))
    aside = None
    if os.path.exists(dst):
        aside = _aside_name(dst, "old")
        os.rename(dst, aside)
    os.rename(tmp, dst)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return dst


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False, marker: dict | None = None) -> Iterator[str]:
    """Yield a temporary directory that becomes `dst` when the block finishes without error."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"output {dst!r} already exists; pass --overwrite to replace it")
    tmp = begin(dst)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, dst, marker)


def publish(root: str, tmp: str, name: str, step: int) -> str:
    """Publish the finished checkpoint directory `tmp` as root/name (with its COMPLETE marker),
    then point `latest` at it."""
    final = commit(tmp, os.path.join(root, name), marker={"step": step})
    write_text_atomic(os.path.join(root, LATEST), name)
    return final


def remove_stale_temps(root: str) -> None:
    """Temporary and set-aside directories of writers that died (kill -9): hidden names that
    no reader takes for a checkpoint; removed before the next one is written."""
    for d in os.listdir(root):
        if d.startswith(".step_") and (".tmp" in d or ".old-" in d):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str, data, indent: int | None = None) -> None:
    """`data` as JSON at `path`, fsynced (a rename may publish it next); a failed write is one
    WriteError naming the file."""
    with writing(path):
        _write_text(path, json.dumps(data, indent=indent))


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    _write_text(tmp, text)
    os.replace(tmp, path)


def save_file(directory: str, fname: str, obj) -> None:
    """torch.save + fsync (the rename that publishes a checkpoint must not overtake the data)."""
    with open(os.path.join(directory, fname), "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_config(directory: str, config: dict) -> None:
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


# --------------------------------------------------------------------------------- reading

def read_json(path: str, what: str = "", error: type[ValueError] = ValueError) -> dict | None:
    """The JSON at `path`, None when there is no such file; unreadable -> `error`, one line
    naming the file (`what` says what it is)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise error(f"{what + ' ' if what else ''}{path} is unreadable ({err})") from None


def read_marker(ckpt_dir: str) -> dict | None:
    return read_json(os.path.join(ckpt_dir, MARKER), "checkpoint marker", CheckpointError)


def verify(ckpt_dir: str) -> None:
    """Every file COMPLETE lists is present with its size (no-op for checkpoints written
    before the marker existed). Cheap (stat only), so every rank can run it before any
    collective and all of them stop with the same line."""
    marker = read_marker(ckpt_dir)
    for fname, size in ((marker or {}).get("files") or {}).items():
        _check_size(os.path.join(ckpt_dir, fname), size)


def verify_file(ckpt_dir: str, fname: str) -> None:
    """One file of a checkpoint is present with the size COMPLETE lists for it."""
    marker = read_marker(ckpt_dir)
    _check_size(os.path.join(ckpt_dir, fname), ((marker or {}).get("files") or {}).get(fname))


def _check_size(path: str, expected: int | None) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    actual = os.path.getsize(path)
    if expected is not None and actual != expected:
        raise CheckpointError(f"checkpoint file {path} is truncated or was modified: {actual} bytes, "
                              f"{expected} when it was written")


def load_file(ckpt_dir: str, fname: str, mmap: bool = False):
    """torch.load of one checkpoint file (weights only), or a CheckpointError naming the file."""
    path = os.path.join(ckpt_dir, fname)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {ckpt_dir!r} has no {fname}; is it a megamoe checkpoint?")
    marker = read_marker(ckpt_dir)
    _check_size(path, ((marker or {}).get("files") or {}).get(fname))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated ({reason})") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["MARKER", "LATEST", "CheckpointError", "WriteError", "writing", "begin", "commit", "atomic_dir", "publish", "remove_stale_temps",
           "write_text_atomic", "write_json", "save_file", "write_config", "read_marker", "verify", "verify_file", "load_file",
           "rng_state", "set_rng_state"]
