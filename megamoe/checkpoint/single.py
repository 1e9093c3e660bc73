"""The single-process format, and loading any checkpoint into a single-process model.

  <out_dir>/checkpoints/step_00000100/{model.pt, optimizer.pt, trainer.pt, config.yaml, COMPLETE}
Everything loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import os
import shutil

import torch

from megamoe.checkpoint import files, resolve


def save_checkpoint(out_dir: str, step: int, state: dict[str, object], config: dict | None = None) -> str:
    """Save `state` ({"model.pt": state_dict, ...}) as checkpoint `step` of out_dir; returns its path."""
    root = resolve.checkpoints_root(out_dir)
    os.makedirs(root, exist_ok=True)
    files.remove_stale_temps(root)
    name = resolve.step_name(step)
    tmp = files.begin(os.path.join(root, name), private=True)
    try:
        for fname, obj in state.items():
            files.save_file(tmp, fname, obj)
        if config is not None:
            files.write_config(tmp, config)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files.publish(root, tmp, name, step)


def is_single_process(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, "model.pt"))


def check_state_fits(ckpt_dir: str, saved: dict, model: torch.nn.Module) -> None:
    """One line for the first tensor that is missing, extra or of another shape."""
    mine = model.state_dict()
    for name, t in mine.items():
        if name not in saved:
            raise ValueError(f"checkpoint {ckpt_dir!r} has no tensor {name!r}; was it saved from another "
                             "model config?")
        if tuple(saved[name].shape) != tuple(t.shape):
            raise ValueError(f"checkpoint {ckpt_dir!r} holds {name!r} with shape {tuple(saved[name].shape)} "
                             f"but this model's is {tuple(t.shape)}; the model configs differ")
    extra = [n for n in saved if n not in mine and not n.endswith("._extra_state")]
    if extra:
        raise ValueError(f"checkpoint {ckpt_dir!r} has {extra[0]!r} (and {len(extra) - 1} more) that this "
                         "model lacks; was it saved from another model config?")


def load_training_state(ckpt_dir: str, model: torch.nn.Module, optimizer) -> dict:
    """Load any megamoe checkpoint into a single-process model + optimizer and return the trainer
    state (step, bad_steps, rng). A single-process checkpoint loads as it was saved (bit-exact
    resume); a sharded one from a parallel run is resharded on the fly."""
    if not is_single_process(ckpt_dir):
        from megamoe.checkpoint import sharded
        return sharded.load(ckpt_dir, model, optimizer)
    files.verify(ckpt_dir)
    saved = files.load_file(ckpt_dir, "model.pt")
    check_state_fits(ckpt_dir, saved, model)
    optim = files.load_file(ckpt_dir, "optimizer.pt")
    trainer = files.load_file(ckpt_dir, "trainer.pt")
    model.load_state_dict(saved)
    optimizer.load_state_dict(optim)
    return trainer


__all__ = ["save_checkpoint", "is_single_process", "check_state_fits", "load_training_state"]
