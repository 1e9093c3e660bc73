"""Reading and writing the files on either side of a conversion.

  megamoe  a checkpoint directory of either format (single-process or the sharded one of
           parallel runs), or an out_dir whose newest complete checkpoint is taken (resolved,
           verified and consolidated by megamoe.checkpoint); `load_megamoe_state` is the one
           entry point.
  HF       config.json + model.safetensors (or sharded with model.safetensors.index.json, or
           pytorch_model*.bin); tensors are read lazily, one at a time.
Every writer goes through megamoe.checkpoint.files.atomic_dir (a temporary sibling directory
renamed into place at the end), so a failed conversion never leaves a half-written output.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import torch
import yaml

from megamoe.checkpoint import files, find_checkpoint
from megamoe.checkpoint.consolidate import consolidate
from megamoe.checkpoint.files import atomic_dir
from megamoe.checkpoint.single import save_checkpoint
from megamoe.config import ModelConfig, TrainConfig, from_dict, to_dict, validate

# ------------------------------------------------------------------------- megamoe checkpoints

def _strip_wrappers(state: dict) -> dict:
    """Drop DDP ("module.") / torch.compile ("_orig_mod.") prefixes from parameter names."""
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


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
    """(ModelConfig, full state dict) of a megamoe checkpoint directory or out_dir."""
    ckpt_dir = find_checkpoint(path)
    files.verify(ckpt_dir)
    cfg = read_model_config(ckpt_dir)
    state = consolidate(ckpt_dir)     # either format, any parallel layout
    if not isinstance(state, dict):
        raise ValueError(f"{ckpt_dir!r}: model.pt does not hold a state dict")
    return cfg, _strip_wrappers(state)


def expected_state(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Names and shapes of a megamoe model's state dict, without allocating its weights."""
    from megamoe.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_state(cfg: ModelConfig, state: dict, what: str) -> None:
    """Raise if `state` does not have exactly the tensors (and shapes) the config builds."""
    expected = expected_state(cfg)
    for k, shape in expected.items():
        if k not in state:
            raise ValueError(f"{what} lacks the tensor {k!r} that the model config implies")
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(f"{what}: tensor {k!r} has shape {tuple(state[k].shape)}, the config "
                             f"implies {tuple(shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"{what} has tensors the model config does not build, e.g. {extra[0]!r}")


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


def write_megamoe(dst: str, cfg: ModelConfig, state: dict, overwrite: bool = False,
                  extra_files: dict[str, str] | None = None, base: TrainConfig | None = None,
                  extra_text: dict[str, str] | None = None) -> str:
    """Write `state` as a megamoe out_dir that `megamoe train --config <dst>/config.yaml` resumes:

      dst/config.yaml                               full training config, out_dir = dst
      dst/checkpoints/step_00000000/model.pt        the weights (fp32)
      dst/checkpoints/step_00000000/optimizer.pt    a fresh AdamW state (no moments yet)
      dst/checkpoints/step_00000000/trainer.pt      step 0, seeded RNG
      dst/checkpoints/step_00000000/config.yaml     (as every checkpoint has)
    `extra_files` {name: source path} are copied into dst (e.g. a tokenizer.json), `extra_text`
    {name: content} written there.
    """
    from megamoe.model.transformer import Transformer
    from megamoe.training.optim import build_optimizer

    check_state(cfg, state, "converted state")
    final = os.path.abspath(dst)
    # fp32 master weights, as training keeps them; bf16/fp16 sources convert losslessly.
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    if cfg.tie_embeddings:  # one tensor, stored once
        state["lm_head.weight"] = state["embed.weight"]
    train = train_config_for(cfg, final, base)
    with torch.device("meta"):
        meta_model = Transformer(cfg)
    optimizer = build_optimizer(meta_model, train.optim).state_dict()  # no tensors: no moments yet
    with torch.random.fork_rng(devices=[]):
        py_state = random.getstate()
        torch.manual_seed(train.seed)
        random.seed(train.seed)
        rng = files.rng_state()
        random.setstate(py_state)
    trainer_state = {"step": 0, "consumed_samples": 0, "bad_steps": 0, "rng": rng}
    with atomic_dir(final, overwrite) as tmp:
        save_checkpoint(tmp, 0, {"model.pt": state, "optimizer.pt": optimizer,
                                      "trainer.pt": trainer_state}, config=to_dict(train))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(to_dict(train), f, sort_keys=False)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, name))
        for name, text in (extra_text or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
    return final


# ----------------------------------------------------------------------------- HF directories

class HFTensors:
    """Lazy read access to the tensors of an HF model directory."""

    def __init__(self, model_dir: str):
        self.dir = model_dir
        self._where: dict[str, tuple[str, str]] = {}   # name -> (file, name inside the file)
        self._handles: dict[str, object] = {}
        self._bin_cache: dict[str, dict] = {}
        for fname in self._weight_files():
            for key in self._file_keys(fname):
                self._where[key] = (fname, key)

    def _weight_files(self) -> list[str]:
        d = self.dir
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            path = os.path.join(d, index)
            if os.path.isfile(path):
                with open(path) as f:
                    weight_map = json.load(f).get("weight_map", {})
                files = sorted(set(weight_map.values()))
                missing = [f for f in files if not os.path.isfile(os.path.join(d, f))]
                if missing:
                    raise ValueError(f"{index} in {d!r} names {missing[0]!r}, which is missing")
                return files
        for single in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(d, single)):
                return [single]
        shards = sorted(f for f in os.listdir(d) if re.fullmatch(r"model-\d+-of-\d+\.safetensors", f))
        if shards:
            return shards
        raise ValueError(f"{d!r} has no model.safetensors (or index / pytorch_model.bin)")

    def _file_keys(self, fname: str) -> list[str]:
        if fname.endswith(".safetensors"):
            return list(self._handle(fname).keys())
        return list(self._load_bin(fname).keys())

    def _handle(self, fname: str):
        from safetensors import safe_open

        if fname not in self._handles:
            try:
                self._handles[fname] = safe_open(os.path.join(self.dir, fname), framework="pt")
            except Exception as err:  # the Rust side raises plain Exceptions
                raise ValueError(f"cannot read {fname!r} in {self.dir!r}: {err}") from None
        return self._handles[fname]

    def _load_bin(self, fname: str) -> dict:
        if fname not in self._bin_cache:
            self._bin_cache[fname] = torch.load(os.path.join(self.dir, fname), map_location="cpu",
                                                weights_only=True)
        return self._bin_cache[fname]

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        fname, key = self._where[name]
        if fname.endswith(".safetensors"):
            return self._handle(fname).get_tensor(key)
        return self._load_bin(fname)[key]

    def rename(self, old: str, new: str) -> None:
        """Make a tensor readable under another name (block aliases of a layout)."""
        self._where[new] = self._where.pop(old)


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


def save_safetensors(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when over the limit.

    Tensors go to shards in order; a shard closes when the next tensor would overflow it (one
    tensor larger than the limit gets a shard of its own)."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
