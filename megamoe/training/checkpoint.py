"""Atomic checkpoints: write everything into a temporary directory, then rename it into place.

Layout:  <out_dir>/checkpoints/step_00000100/{model.pt, optimizer.pt, trainer.pt, config.yaml}
         <out_dir>/checkpoints/latest          (text: the directory name of the newest one)
A crash at any point leaves either the previous checkpoint or the new one complete — never a
directory that looks valid but is not: a checkpoint counts only once its directory has the
final name, and `latest` is itself replaced atomically (os.replace).
Everything loads with torch.load(weights_only=True).
"""

import os
import random
import shutil

import torch
import yaml

CKPT_DIR = "checkpoints"


def _ckpt_root(out_dir: str) -> str:
    return os.path.join(out_dir, CKPT_DIR)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(out_dir: str, step: int, files: dict[str, object], config: dict | None = None,
                    keep_last: int = 0) -> str:
    """Save `files` ({"model.pt": state_dict, ...}) as checkpoint `step`; returns its path."""
    root = _ckpt_root(out_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for fname, obj in files.items():
        with open(os.path.join(tmp, fname), "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    if config is not None:
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _atomic_write_text(os.path.join(root, "latest"), name)
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def list_checkpoints(out_dir: str) -> list[str]:
    root = _ckpt_root(out_dir)
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("step_") and ".tmp" not in d)


def latest_checkpoint(out_dir: str) -> str | None:
    """Path of the newest complete checkpoint, or None."""
    root = _ckpt_root(out_dir)
    pointer = os.path.join(root, "latest")
    if os.path.exists(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if name and os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    names = list_checkpoints(out_dir)  # pointer missing or stale: fall back to the newest dir
    return os.path.join(root, names[-1]) if names else None


def load_file(ckpt_dir: str, fname: str, map_location="cpu"):
    path = os.path.join(ckpt_dir, fname)
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {ckpt_dir!r} has no {fname}; is it a megamoe checkpoint?")
    return torch.load(path, map_location=map_location, weights_only=True)
