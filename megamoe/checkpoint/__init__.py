"""Checkpoints: the on-disk formats, atomic publishing, finding, loading (with resharding) and
consolidation. `training/`, `parallel/`, `hf/` and `analysis/` all go through this package.

An out_dir holds
  checkpoints/step_00000100/     one checkpoint, single-process or sharded format, with COMPLETE
  checkpoints/latest             the newest one's name, for humans and tools (never trusted)

  files.py        the one atomic directory writer (temporary sibling, rename; an existing
                  directory is renamed aside before it is removed), publishing with the COMPLETE
                  marker (every file's size), reading with one-line errors (CheckpointError),
                  write sites with one-line errors (writing / WriteError: disk full, quota)
  resolve.py      the one resolver: a checkpoint dir or an out_dir -> a checkpoint; the newest
                  *complete* checkpoint of an out_dir
  single.py       single-process format: model.pt, optimizer.pt, trainer.pt, config.yaml
  sharded.py      parallel runs: model_rank{r}.pt, optim_rank{r}.pt, metadata.json; save
                  (collective), load into any layout or one process
  weights.py      model-only format of conversions (from-hf, upcycle, vocabulary extension):
                  model-*.safetensors + metadata.json + trainer.pt, written as a stream, read
                  by any layout with each rank reading only its rows (WeightsSource)
  stfiles.py      safetensors read with positioned reads (no mmap: bounded RSS) and written
                  shard by shard without copies; shared with the HF side
  sources.py      read side of all formats, tensor pieces by name
  reshard.py      slice assembly from pieces (pure tensor code)
  consolidate.py  any checkpoint -> one process (`python -m megamoe consolidate`)

Resuming picks the newest complete checkpoint (or `resume_from`). A file that is missing,
truncated or unreadable stops the run with one line naming the file and the previous complete
checkpoint to resume from instead (`--resume_from`): resuming silently from an older state
would redo steps nobody asked to redo.
"""

from megamoe.checkpoint.files import CheckpointError, atomic_dir, load_file, rng_state, set_rng_state
from megamoe.checkpoint.resolve import (CKPT_DIR, find_checkpoint, list_checkpoints, newest_checkpoint,
                                        previous_checkpoint)
from megamoe.checkpoint.single import load_training_state, save_checkpoint

__all__ = ["CheckpointError", "atomic_dir", "load_file", "rng_state", "set_rng_state", "CKPT_DIR",
           "find_checkpoint", "list_checkpoints", "newest_checkpoint", "previous_checkpoint",
           "load_training_state", "save_checkpoint"]
