"""Model-only sharded checkpoints ("megamoe-weights"): what conversions write (from-hf, upcycle,
vocabulary extension), streamed one tensor at a time, and what any parallel layout loads with
each rank reading only its slices.

  step_00000000/model.safetensors, or model-0000i-of-0000n.safetensors   full tensors in model
                     order, files of at most max_shard_bytes (stfiles.ShardWriter)
               /metadata.json   {"format": "megamoe-weights", "version": 1,
                                 "tensors": {name: {"shape", "dtype", "file"}}}
               /trainer.pt      step 0 and a seeded RNG
               /config.yaml, COMPLETE (files.publish: every file's size)
There is no optimizer state: a run resuming it starts AdamW fresh (sharded.load). Tied
embeddings are stored once, as embed.weight (sources.TIED reads lm_head.weight from it).
Dtypes are the source's (bf16 stays bf16); training casts to its own param dtype when loading.

Reading (sources.WeightsSource, picked by sources.open_source): a piece is a LazyRows view of one
stored tensor; reshard.assemble indexes it block by block and each block reads only the rows of
the first dim it covers (positioned reads, no mmap), so an expert-parallel rank reads only its
experts and a pipeline stage only its layers; a rank never holds more than its slice plus the
rows of one tensor.
"""

from __future__ import annotations

import os

import torch

from megamoe.checkpoint import files
from megamoe.checkpoint.sources import META, WEIGHTS_FORMAT as FORMAT, WEIGHTS_VERSION as VERSION
from megamoe.checkpoint.sources import LazyRows, WeightsSource, _dtype_name
from megamoe.checkpoint.stfiles import ShardWriter

DEFAULT_SHARD_BYTES = 2 * 10**9


class WeightsWriter:
    """add(name, tensor) in any order, then finish(): the weights files and metadata.json of a
    megamoe-weights checkpoint in `ckpt_dir` (a temporary directory the caller publishes)."""

    def __init__(self, ckpt_dir: str, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.dir = ckpt_dir
        self._shards = ShardWriter(ckpt_dir, max_shard_bytes, "model", metadata={"format": "pt"})
        self._info: dict[str, dict] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._info:
            raise ValueError(f"tensor {name!r} written twice")
        self._info[name] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        self._shards.add(name, t)

    def finish(self, config: dict, trainer_state: dict) -> None:
        where = self._shards.finish()
        for name, info in self._info.items():
            info["file"] = where[name]
        files.write_json(os.path.join(self.dir, META),
                         {"format": FORMAT, "version": VERSION, "tensors": self._info})
        path = os.path.join(self.dir, "trainer.pt")
        with files.writing(path):
            files.save_file(self.dir, "trainer.pt", trainer_state)
        path = os.path.join(self.dir, "config.yaml")
        with files.writing(path):
            files.write_config(self.dir, config)


__all__ = ["FORMAT", "VERSION", "DEFAULT_SHARD_BYTES", "WeightsWriter", "LazyRows", "WeightsSource"]
