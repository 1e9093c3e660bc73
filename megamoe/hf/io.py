"""Reading and writing the files on either side of a conversion, streaming: no side ever holds
the whole model (peak memory ~ one output shard + the tensors of one layer).

  megamoe  read: a checkpoint directory of any format (single-process model.pt, the sharded one
           of parallel runs, or the model-only one conversions write), or an out_dir whose newest
           complete checkpoint is taken (megamoe.checkpoint resolves and verifies it);
           `MegamoeState` gives one full tensor at a time, `load_megamoe_state` everything.
           write: `megamoe_writer` streams tensors into a megamoe out_dir whose step-0 checkpoint
           is in the model-only sharded format (megamoe.checkpoint.weights); `write_megamoe`
           writes a whole state dict through it.
  HF       config.json + model.safetensors (or sharded with model.safetensors.index.json, or
           pytorch_model*.bin); tensors are read lazily, one at a time (HFTensors);
           `save_safetensors` streams (name, tensor) pairs into shards.
Every writer goes through megamoe.checkpoint.files.atomic_dir (a temporary sibling directory
renamed into place at the end), so a failed conversion never leaves a half-written output, and
every write site turns a failed write (disk full, quota) into one line naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from typing import Iterator

import torch
import yaml

from megamoe.checkpoint import files, find_checkpoint
from megamoe.checkpoint.consolidate import consolidate
from megamoe.checkpoint.files import atomic_dir
from megamoe.checkpoint.resolve import checkpoints_root, step_name
from megamoe.checkpoint.sources import TIED, open_source
from megamoe.checkpoint.stfiles import SafetensorsFile, ShardWriter, trim_heap
from megamoe.checkpoint.weights import DEFAULT_SHARD_BYTES, WeightsWriter
from megamoe.config import ModelConfig, TrainConfig, from_dict, to_dict, validate
from megamoe.parallel.params import full_index

# What from-hf keeps of the HF side for to-hf (model type, special token ids, generation config,
# tokenizer file names), next to the tokenizer files in the out_dir.
HF_META = "hf_export.json"

# ------------------------------------------------------------------------- megamoe checkpoints

def _strip(name: str) -> str:
    """Drop DDP ("module.") / torch.compile ("_orig_mod.") prefixes from a parameter name."""
    while name.startswith(("module.", "_orig_mod.")):
        name = name.split(".", 1)[1]
    return name


def _strip_wrappers(state: dict) -> dict:
    return {_strip(k): v for k, v in state.items()}


def read_model_config(ckpt_dir: str) -> ModelConfig:
    path = os.path.join(ckpt_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {ckpt_dir!r} has no config.yaml")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict) or "model" not in data:
        raise ValueError(f"{path!r} has no 'model' section")
    model = data["model"]
    return from_dict(ModelConfig, model, where="model.") if model is not None else ModelConfig()


def load_megamoe_state(path: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, full state dict) of a megamoe checkpoint directory or out_dir. Holds the
    whole model: conversions use MegamoeState instead."""
    ckpt_dir = find_checkpoint(path)
    files.verify(ckpt_dir)
    cfg = read_model_config(ckpt_dir)
    state = consolidate(ckpt_dir)     # any format, any parallel layout
    return cfg, _strip_wrappers(state)


def out_dir_of(ckpt_dir: str) -> str | None:
    """The out_dir holding a checkpoint directory (out_dir/checkpoints/step_X), or None."""
    parent = os.path.dirname(os.path.abspath(ckpt_dir))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None


def read_hf_meta(path: str) -> tuple[dict, str | None]:
    """(HF_META contents, the directory holding it) for a checkpoint or out_dir, or ({}, None)."""
    ckpt_dir = find_checkpoint(path)
    for d in (path, ckpt_dir, out_dir_of(ckpt_dir)):
        meta = files.read_json(os.path.join(d, HF_META)) if d else None
        if meta is not None:
            return meta, d
    return {}, None


class MegamoeState:
    """Lazy, read-only {name: full tensor} of a megamoe checkpoint of any format: `names` (model
    order, shapes), `state[name]` assembles one fresh tensor, `release()` closes the files read
    so far (call it between layers: an mmap keeps every page read resident)."""

    def __init__(self, path: str):
        self.ckpt_dir = find_checkpoint(path)
        files.verify(self.ckpt_dir)
        self.cfg = read_model_config(self.ckpt_dir)
        self.what = "megamoe checkpoint"
        self.source = open_source(self.ckpt_dir)
        self._saved = {_strip(n): n for n in self.source.names}
        if self.cfg.tie_embeddings:       # stored once: either name reads the one tensor
            for a, b in TIED.items():
                if a not in self._saved and b in self._saved:
                    self._saved[a] = self._saved[b]
        shapes = {n: tuple(self.source.names[o]["shape"]) for n, o in self._saved.items()}
        check_shapes(self.cfg, shapes, "megamoe checkpoint")
        self.names = expected_state(self.cfg)

    def dtype(self, name: str) -> torch.dtype:
        return getattr(torch, self.source.names[self._saved[name]]["dtype"])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.source.weights(self._saved[name], full_index(self.names[name]))

    def release(self) -> None:
        self.source.release()
        trim_heap()


def expected_state(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Names and shapes of a megamoe model's state dict, without allocating its weights."""
    from megamoe.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def stored_names(cfg: ModelConfig, names) -> list[str]:
    """`names` without the tied head: with tied embeddings lm_head.weight is embed.weight,
    read and written once."""
    return [n for n in names if not (cfg.tie_embeddings and n == "lm_head.weight")]


def check_shapes(cfg: ModelConfig, shapes: dict, what: str) -> None:
    """Raise if `shapes` ({name: shape}) are not exactly the tensors the config builds."""
    expected = expected_state(cfg)
    for k, shape in expected.items():
        if k not in shapes:
            raise ValueError(f"{what} lacks the tensor {k!r} that the model config implies")
        if tuple(shapes[k]) != tuple(shape):
            raise ValueError(f"{what}: tensor {k!r} has shape {tuple(shapes[k])}, the config "
                             f"implies {tuple(shape)}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ValueError(f"{what} has tensors the model config does not build, e.g. {extra[0]!r}")


def check_state(cfg: ModelConfig, state: dict, what: str) -> None:
    """Raise if `state` does not have exactly the tensors (and shapes) the config builds."""
    check_shapes(cfg, {k: v.shape for k, v in state.items()}, what)


def train_config_for(cfg: ModelConfig, out_dir: str, base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig that continues training `cfg` from `out_dir` (training settings: `base` or
    defaults; edit them in config.yaml)."""
    train = base if base is not None else TrainConfig()
    train.model = cfg
    train.out_dir = out_dir
    train.resume = True
    # Keep the default parallel settings valid for any vocabulary / head count.
    validate(train)
    return train


def _fresh_trainer_state(seed: int) -> dict:
    with torch.random.fork_rng(devices=[]):
        py_state = random.getstate()
        torch.manual_seed(seed)
        random.seed(seed)
        rng = files.rng_state()
        random.setstate(py_state)
    return {"step": 0, "consumed_samples": 0, "bad_steps": 0, "rng": rng}


class MegamoeWriter:
    """add(name, tensor) for every tensor of the model, in any order (see `megamoe_writer`)."""

    def __init__(self, cfg: ModelConfig, ckpt_dir: str, max_shard_bytes: int):
        self.cfg = cfg
        self.expected = expected_state(cfg)
        self._w = WeightsWriter(ckpt_dir, max_shard_bytes)

    def add(self, name: str, t: torch.Tensor) -> None:
        if name not in self.expected:
            raise ValueError(f"converted state has tensors the model config does not build, e.g. {name!r}")
        if tuple(t.shape) != tuple(self.expected[name]):
            raise ValueError(f"converted state: tensor {name!r} has shape {tuple(t.shape)}, the config "
                             f"implies {tuple(self.expected[name])}")
        if name == "lm_head.weight" and self.cfg.tie_embeddings:
            return                        # one tensor, stored once as embed.weight
        self._w.add(name, t)

    def missing(self) -> list[str]:
        tied = self.cfg.tie_embeddings
        return [n for n in self.expected if n not in self._w and not (tied and n == "lm_head.weight")]


@contextlib.contextmanager
def megamoe_writer(dst: str, cfg: ModelConfig, overwrite: bool = False, base: TrainConfig | None = None,
                   extra_files: dict[str, str] | None = None, extra_text: dict[str, str] | None = None,
                   max_shard_size: str | int = DEFAULT_SHARD_BYTES) -> Iterator[MegamoeWriter]:
    """Yield a writer whose tensors become a megamoe out_dir that `megamoe train --config
    <dst>/config.yaml` resumes, published when the block ends without error:

      dst/config.yaml                                  full training config, out_dir = dst
      dst/checkpoints/step_00000000/model*.safetensors the weights, source dtypes, files of at
                                    metadata.json      most max_shard_size (checkpoint.weights)
                                    trainer.pt         step 0, seeded RNG (no optimizer state:
                                    config.yaml        AdamW starts fresh)
    `extra_files` {name: source path} are copied into dst (e.g. tokenizer files), `extra_text`
    {name: content} written there."""
    final = os.path.abspath(dst)
    train = train_config_for(cfg, final, base)
    with atomic_dir(final, overwrite) as tmp:
        root, name = checkpoints_root(tmp), step_name(0)
        os.makedirs(root)
        ckpt_tmp = files.begin(os.path.join(root, name), private=True)
        writer = MegamoeWriter(cfg, ckpt_tmp, parse_size(max_shard_size))
        yield writer
        missing = writer.missing()
        if missing:
            raise ValueError(f"converted state lacks the tensor {missing[0]!r} that the model config implies")
        writer._w.finish(to_dict(train), _fresh_trainer_state(train.seed))
        files.publish(root, ckpt_tmp, name, 0)
        path = os.path.join(tmp, "config.yaml")
        with files.writing(path), open(path, "w") as f:
            yaml.safe_dump(to_dict(train), f, sort_keys=False)
        for fname, src in (extra_files or {}).items():
            with files.writing(os.path.join(tmp, fname)):
                shutil.copyfile(src, os.path.join(tmp, fname))
        for fname, text in (extra_text or {}).items():
            with files.writing(os.path.join(tmp, fname)), \
                    open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(text)


def write_megamoe(dst: str, cfg: ModelConfig, state: dict, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None, base: TrainConfig | None = None,
                  extra_text: dict[str, str] | None = None,
                  max_shard_size: str | int = DEFAULT_SHARD_BYTES) -> str:
    """Write a whole state dict as a megamoe out_dir (see `megamoe_writer`)."""
    check_state(cfg, state, "converted state")
    with megamoe_writer(dst, cfg, overwrite, base, extra_files, extra_text, max_shard_size) as w:
        for name, t in state.items():
            w.add(name, t)
    return os.path.abspath(dst)


# ----------------------------------------------------------------------------- HF directories

class HFTensors:
    """Lazy read access to the tensors of an HF model directory: each read returns a fresh tensor
    and holds nothing else. safetensors files are read with positioned reads (stfiles); a
    pytorch_model*.bin is opened with torch.load(mmap=True), one file at a time (its mapped pages
    count in RSS, so the previous file is closed first). A truncated or corrupt file is one
    ValueError naming it."""

    def __init__(self, model_dir: str):
        self.dir = model_dir
        self._where: dict[str, tuple[str, str]] = {}   # name -> (file, name inside the file)
        self._handles: dict[str, SafetensorsFile] = {}
        self._bin: tuple[str, dict] | None = None      # the one open .bin file
        for fname in self._weight_files():
            for key in self._file_keys(fname):
                self._where[key] = (fname, key)
            self.release()

    def _weight_files(self) -> list[str]:
        d = self.dir
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_json = files.read_json(os.path.join(d, index))
            if index_json is not None:
                names = sorted(set(index_json.get("weight_map", {}).values()))
                missing = [f for f in names if not os.path.isfile(os.path.join(d, f))]
                if missing:
                    raise ValueError(f"{index} in {d!r} names {missing[0]!r}, which is missing")
                return names
        for single in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(d, single)):
                return [single]
        shards = sorted(f for f in os.listdir(d) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f))
        if shards:
            return shards
        raise ValueError(f"{d!r} has no model.safetensors (or index / pytorch_model.bin)")

    def _file_keys(self, fname: str) -> list[str]:
        if fname.endswith(".safetensors"):
            return self._handle(fname).keys()
        return list(self._load_bin(fname).keys())

    def _handle(self, fname: str) -> SafetensorsFile:
        if fname not in self._handles:
            try:
                self._handles[fname] = SafetensorsFile(os.path.join(self.dir, fname))
            except OSError as err:
                raise ValueError(f"cannot read {os.path.join(self.dir, fname)}: {err.strerror or err}") from None
        return self._handles[fname]

    def _load_bin(self, fname: str) -> dict:
        if self._bin is None or self._bin[0] != fname:
            self._bin = None
            self._bin = (fname, load_torch_file(os.path.join(self.dir, fname)))
        return self._bin[1]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        fname, key = self._where[name]
        if fname.endswith(".safetensors"):
            return self._handle(fname).read(key)
        return self._load_bin(fname)[key].clone()     # not a view of the mapped file

    def dtype(self, name: str) -> torch.dtype:
        fname, key = self._where[name]
        if fname.endswith(".safetensors"):
            return self._handle(fname).dtype(key)
        return self._load_bin(fname)[key].dtype

    def rename(self, old: str, new: str) -> None:
        """Make a tensor readable under another name (block aliases of a layout)."""
        self._where[new] = self._where.pop(old)

    def release(self) -> None:
        """Close every open file (streaming readers call this between layers)."""
        for h in self._handles.values():
            h.close()
        self._handles.clear()
        self._bin = None
        trim_heap()


def load_torch_file(path: str) -> dict:
    """torch.load of a state-dict file (mmap'd where the format allows), or one ValueError line
    naming it when it is truncated or corrupt."""
    import pickle
    import zipfile

    errors = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)   # legacy format
    except errors as err:
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        raise ValueError(f"{path} is truncated or corrupt ({reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return data


def read_hf_config(model_dir: str) -> dict:
    if not os.path.isdir(model_dir):
        raise ValueError(f"{model_dir!r} is not a directory")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir!r} has no config.json; is it a Hugging Face model directory?")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not valid JSON: {err}") from None


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes (decimal units like transformers; 'iB' binary)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or a number of bytes")
    num, unit = float(m.group(1)), (m.group(2) or "").upper()
    base = 1024 if "I" in unit else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1] if unit[:1] in "KMGT" else ""]
    size = int(num * base ** power)
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def save_safetensors(tensors, out_dir: str, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when over the limit, from a
    dict or an iterable of (name, tensor) pairs consumed as it goes (one shard held at a time).

    Tensors go to shards in order; a shard closes when the next tensor would overflow it (one
    tensor larger than the limit gets a shard of its own)."""
    writer = ShardWriter(out_dir, max_shard_bytes, "model", metadata={"format": "pt"})
    for name, t in (tensors.items() if isinstance(tensors, dict) else tensors):
        writer.add(name, t)
    where = writer.finish()
    names = sorted(set(where.values()))
    if len(names) > 1:
        files.write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                         {"metadata": {"total_size": writer.total_size}, "weight_map": where}, indent=2)
    return names
