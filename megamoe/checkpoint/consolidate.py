"""Consolidation: any checkpoint (any parallel layout) -> full tensors, a single-process checkpoint
directory that Trainer.load resumes, or one .pt of weights; `python -m megamoe consolidate`.
Holds the whole model in memory (one file at a time).
"""

from __future__ import annotations

import os

import torch

from megamoe.checkpoint import files
from megamoe.checkpoint.resolve import find_checkpoint
from megamoe.checkpoint.sources import MOMENTS, open_source
from megamoe.parallel.params import full_index


def consolidate(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """{name: full tensor} of any megamoe checkpoint (fp32 masters where saved). Holds the whole
    model; with tied embeddings lm_head.weight is embed.weight, as in a single-process model."""
    source = open_source(ckpt_dir)
    full = {name: source.weights(name, full_index(info["shape"])) for name, info in source.names.items()}
    if source.tie and "embed.weight" in full:   # stored once by model-only checkpoints
        full["lm_head.weight"] = full["embed.weight"]
    return full


# Parallel settings reset when a checkpoint is consolidated for a single process.
LAYOUT_KEYS = ("tp", "pp", "dp", "ep", "etp", "virtual_pp", "pp_layout", "zero1", "sequence_parallel")


def consolidated_optimizer(source) -> dict:
    """The torch AdamW state_dict a single-process Trainer of the same model would have, from a
    checkpoint source of any layout (sources.open_source)."""
    from megamoe.config import TrainConfig, from_dict
    from megamoe.model.transformer import Transformer
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


def write_consolidated(src: str, dst: str, overwrite: bool = False) -> str:
    """A single-process checkpoint directory (model.pt, optimizer.pt, trainer.pt, config.yaml with
    the parallel layout reset) that Trainer.load resumes, from a checkpoint of any layout; or,
    when dst ends in .pt, one file with the consolidated weights. `src`: a checkpoint directory
    or an out_dir (its latest checkpoint). Needs memory for the full model (one file at a time)."""
    from megamoe.config import ParallelConfig

    ckpt_dir = find_checkpoint(src)
    files.verify(ckpt_dir)
    if dst.endswith(".pt"):
        if os.path.exists(dst) and not overwrite:
            raise ValueError(f"output {dst!r} already exists; pass --overwrite to replace it")
        tmp = f"{dst}.tmp-{os.getpid()}"
        torch.save(consolidate(ckpt_dir), tmp)
        os.replace(tmp, dst)
        return dst
    source = open_source(ckpt_dir)
    config = dict(source.config)
    config["parallel"] = {**(config.get("parallel") or {}),
                          **{k: getattr(ParallelConfig(), k) for k in LAYOUT_KEYS}}
    step = int(source.trainer_state().get("step", 0))
    with files.atomic_dir(dst, overwrite, marker={"step": step}) as tmp:
        files.save_file(tmp, "model.pt", consolidate(ckpt_dir))
        files.save_file(tmp, "optimizer.pt", consolidated_optimizer(source))
        files.save_file(tmp, "trainer.pt", {**source.trainer_state(), "rng": source.rng(0) or files.rng_state()})
        files.write_config(tmp, config)
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


__all__ = ["consolidate", "consolidated_optimizer", "write_consolidated", "main", "LAYOUT_KEYS"]
