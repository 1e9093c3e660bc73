"""Atomic checkpoints: write everything into a temporary directory, then rename it into place.

Layout:  <out_dir>/checkpoints/step_00000100/{model.pt, optimizer.pt, trainer.pt, config.yaml}
         <out_dir>/checkpoints/latest          (text: the directory name of the newest one)
A crash at any point leaves either the previous checkpoint or the new one complete — never a
directory that looks valid but is not: a checkpoint counts only once its directory has the
final name, and `latest` is itself replaced atomically (os.replace).
Everything loads with torch.load(weights_only=True).
Parallel runs write sharded checkpoints instead (megamoe.parallel.dist_checkpoint: per-rank
files + metadata.json, loadable into any layout); `load_training_state` loads either kind
into a single-process model + optimizer.
"""

import contextlib
import os
import random
import shutil
from typing import Iterator

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


def save_file(directory: str, fname: str, obj) -> None:
    """torch.save + fsync (the rename that publishes a checkpoint must not overtake the data)."""
    with open(os.path.join(directory, fname), "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_config(directory: str, config: dict) -> None:
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)


def remove_stale_temps(root: str) -> None:
    """Temporary directories left by a writer that died (kill -9) never become checkpoints
    (list_checkpoints skips them); remove them before writing the next one."""
    for d in os.listdir(root):
        if d.startswith(".step_") and ".tmp" in d:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def publish(root: str, tmp: str, name: str) -> str:
    """Rename the finished temporary directory to `name` and point `latest` at it."""
    final = os.path.join(root, name)
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _atomic_write_text(os.path.join(root, "latest"), name)
    return final


def save_checkpoint(out_dir: str, step: int, files: dict[str, object], config: dict | None = None,
                    keep_last: int = 0) -> str:
    """Save `files` ({"model.pt": state_dict, ...}) as checkpoint `step`; returns its path."""
    root = _ckpt_root(out_dir)
    os.makedirs(root, exist_ok=True)
    remove_stale_temps(root)
    name = f"step_{step:08d}"
    tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}")
    os.makedirs(tmp)
    for fname, obj in files.items():
        save_file(tmp, fname, obj)
    if config is not None:
        write_config(tmp, config)
    final = publish(root, tmp, name)
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_dir(dst: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary sibling directory that becomes `dst` when the block succeeds."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise ValueError(f"output {dst!r} already exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.rename(tmp, dst)


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


def is_single_process(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, "model.pt"))


def load_training_state(ckpt_dir: str, model: torch.nn.Module, optimizer) -> dict:
    """Load any megamoe checkpoint into a single-process model + optimizer and return the trainer
    state for Trainer.load_trainer_state. A single-process checkpoint loads as it was saved
    (bit-exact resume); a sharded one from a parallel run is consolidated on the fly."""
    if is_single_process(ckpt_dir):
        model.load_state_dict(load_file(ckpt_dir, "model.pt"))
        optimizer.load_state_dict(load_file(ckpt_dir, "optimizer.pt"))
        return load_file(ckpt_dir, "trainer.pt")
    from megamoe.parallel import dist_checkpoint  # parallel code only when it is needed

    return dist_checkpoint.load(ckpt_dir, model, optimizer)


# ------------------------------------------------------------------------------ consolidation
# Parallel settings reset when a checkpoint is consolidated for a single process.
LAYOUT_KEYS = ("tp", "pp", "dp", "ep", "etp", "virtual_pp", "pp_layout", "zero1", "sequence_parallel")


def consolidated_optimizer(source) -> dict:
    """The torch AdamW state_dict a single-process Trainer of the same model would have, from a
    checkpoint source of any layout (megamoe.parallel.dist_checkpoint.open_source)."""
    from megamoe.config import TrainConfig, from_dict
    from megamoe.model.transformer import Transformer
    from megamoe.parallel.dist_checkpoint import MOMENTS
    from megamoe.parallel.params import full_index
    from megamoe.training.optim import param_groups

    if getattr(source, "legacy", False):
        raise ValueError(f"{source.dir!r} was written by an older megamoe (no metadata.json); only its "
                         "weights can be consolidated (write a .pt file)")
    cfg = from_dict(TrainConfig, source.config)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps)
    name_of = {id(p): n for n, p in model.named_parameters()}
    saved = optimizer.state_dict()      # positions and hyperparameters; no state yet
    for group, packed in zip(optimizer.param_groups, saved["param_groups"]):
        for p, i in zip(group["params"], packed["params"]):
            st = source.optim_state(name_of[id(p)], full_index(p.shape))
            if st is not None:
                saved["state"][i] = {"step": torch.tensor(st["step"]), **{k: st[k] for k in MOMENTS}}
    return saved


def find_checkpoint(path: str) -> str:
    """`path` if it is a checkpoint directory (any format), else the latest one of an out_dir."""
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f))
                                   for f in ("model.pt", "metadata.json", "model_rank0.pt")):
        return path
    latest = latest_checkpoint(path) if os.path.isdir(path) else None
    if latest is None:
        raise ValueError(f"{path!r} is neither a megamoe checkpoint directory nor an out_dir with checkpoints")
    return latest


def write_consolidated(src: str, dst: str, overwrite: bool = False) -> str:
    """A single-process checkpoint directory (model.pt, optimizer.pt, trainer.pt, config.yaml with
    the parallel layout reset) that Trainer.load resumes, from a checkpoint of any layout; or,
    when dst ends in .pt, one file with the consolidated weights. `src`: a checkpoint directory
    or an out_dir (its latest checkpoint). Needs memory for the full model (one file at a time)."""
    from megamoe.config import ParallelConfig
    from megamoe.parallel import dist_checkpoint as dc

    ckpt_dir = find_checkpoint(src)
    if dst.endswith(".pt"):
        if os.path.exists(dst) and not overwrite:
            raise ValueError(f"output {dst!r} already exists; pass --overwrite to replace it")
        tmp = f"{dst}.tmp-{os.getpid()}"
        torch.save(dc.consolidate(ckpt_dir), tmp)
        os.replace(tmp, dst)
        return dst
    source = dc.open_source(ckpt_dir)
    config = dict(source.config)
    config["parallel"] = {**(config.get("parallel") or {}),
                          **{k: getattr(ParallelConfig(), k) for k in LAYOUT_KEYS}}
    with atomic_dir(dst, overwrite) as tmp:
        save_file(tmp, "model.pt", dc.consolidate(ckpt_dir))
        save_file(tmp, "optimizer.pt", consolidated_optimizer(source))
        save_file(tmp, "trainer.pt", {**source.trainer_state(), "rng": source.rng(0) or rng_state()})
        write_config(tmp, config)
    return dst


def main(argv: list[str] | None = None) -> int:
    """`python -m megamoe consolidate SRC DST [--overwrite]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="megamoe consolidate",
        description="Merge a checkpoint of any parallel layout into a single-process one.")
    parser.add_argument("src", help="checkpoint directory (step_XXXXXXXX) or an out_dir (its latest)")
    parser.add_argument("dst", help="output checkpoint directory, or a .pt file for the weights only")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    print(f"wrote {write_consolidated(args.src, args.dst, args.overwrite)}")
    return 0
