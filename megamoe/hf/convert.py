"""megamoe <-> Hugging Face checkpoint conversion (`python -m megamoe convert`).

  megamoe convert to-hf   SRC DST [--model-type olmoe] [--tokenizer DIR] [--max-shard-size 5GB]
  megamoe convert from-hf SRC DST [--seq-length 4096]

to-hf: SRC is a megamoe checkpoint directory or an out_dir (its latest checkpoint); DST gets
config.json, generation_config.json, model.safetensors (sharded + index past --max-shard-size)
and, with --tokenizer, the tokenizer files. Expert weights are written per expert, the layout
transformers' save_pretrained writes and from_pretrained reads.
from-hf: SRC is an HF model directory (per-expert keys, or the fused transformers 5.x
`experts.gate_up_proj` / `experts.down_proj` tensors); DST becomes a megamoe out_dir that
`python -m megamoe train --config DST/config.yaml` continues from (see io.write_megamoe).
Model types and what each one refuses: megamoe/hf/layouts.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

import torch

from megamoe.config import ModelConfig, TrainConfig, validate
from megamoe.checkpoint.files import atomic_dir
from megamoe.hf.io import (HFTensors, check_state, expected_state, is_hf_dir,
                           load_megamoe_state, parse_size, read_hf_config, save_safetensors,
                           write_megamoe)
from megamoe.hf.layouts import (config_from_hf, config_to_hf, expert_keys, fused_expert_keys,
                                get_layout, hf_name, infer_model_type, is_expert_tensor)
from megamoe.hf.layouts_deepseek import mla_tensor_from_hf, mla_tensor_to_hf

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

# Tokenizer files copied from a --tokenizer directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


# --------------------------------------------------------------------------- state dicts

def to_hf_state(cfg: ModelConfig, state: dict, model_type: str,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF tensors (per-expert layout) of a megamoe state dict; `dtype` casts floating tensors
    (the router selection bias stays fp32, as transformers keeps it)."""
    layout = get_layout(model_type)
    check_state(cfg, state, "megamoe checkpoint")
    out: dict[str, torch.Tensor] = {}

    def put(name: str, t: torch.Tensor, keep_fp32: bool = False) -> None:
        if dtype is not None and t.is_floating_point() and not keep_fp32:
            t = t.to(dtype)
        out[name] = t.contiguous()

    for name, t in state.items():
        if is_expert_tensor(name):
            layer = name.split(".")[1]
            if name.endswith("w_gate_up"):            # [E, H, 2I] -> per expert [I, H] x 2
                inter = t.shape[-1] // 2
                for e in range(t.shape[0]):
                    gate, up, _ = expert_keys(layout, layer, e)
                    put(gate, t[e, :, :inter].t())
                    put(up, t[e, :, inter:].t())
            else:                                      # [E, I, H] -> per expert [H, I]
                for e in range(t.shape[0]):
                    put(expert_keys(layout, layer, e)[2], t[e].t())
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF stores tied weights once, as embed_tokens
        key = hf_name(layout, name)
        if key is None:
            continue  # a softmax router's selection bias: unused by megamoe, absent in HF
        if layout.attention == "mla":
            t = mla_tensor_to_hf(cfg, name, t)  # rotary rows in DeepSeek's interleaved order
        put(key, t, keep_fp32=name.endswith("router.expert_bias"))
    return out


class _DictTensors:
    """The HFTensors interface over an in-memory dict (e.g. a transformers model's state dict)."""

    def __init__(self, tensors: dict):
        self._t = dict(tensors)

    def keys(self):
        return list(self._t)

    def __contains__(self, name):
        return name in self._t

    def __getitem__(self, name):
        return self._t[name]

    def rename(self, old, new):
        self._t[new] = self._t.pop(old)


def _read_experts(hf, layout, layer: str, num_experts: int, used: set) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_gate_up [E, H, 2I], w_down [E, I, H]) from fused or per-expert HF tensors."""
    fused_gu, fused_down = fused_expert_keys(layout, layer)
    if fused_gu in hf and fused_down in hf:
        gate_up, down = hf[fused_gu], hf[fused_down]              # [E, 2I, H], [E, H, I]
        used.update((fused_gu, fused_down))
    else:
        gates, ups, downs = [], [], []
        for e in range(num_experts):
            keys = expert_keys(layout, layer, e)
            for k in keys:
                if k not in hf:
                    raise ValueError(f"{layout.model_type} checkpoint lacks {k!r} (expert {e} of "
                                     f"layer {layer})")
            gates.append(hf[keys[0]])
            ups.append(hf[keys[1]])
            downs.append(hf[keys[2]])
            used.update(keys)
        gate_up = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)   # [E, 2I, H]
        down = torch.stack(downs)                                             # [E, H, I]
    return gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def from_hf_state(cfg: ModelConfig, tensors, model_type: str,
                  hf_config: dict | None = None) -> tuple[dict, list[str]]:
    """(megamoe state dict, notes) from HF tensors (an HFTensors or a plain dict); `hf_config`
    (config.json) says how deepseek_v3 stores its rotary rows (rope_interleave, default true)."""
    layout = get_layout(model_type)
    interleaved = (hf_config or {}).get("rope_interleave", True) is not False
    hf = _DictTensors(tensors) if isinstance(tensors, dict) else tensors
    for key in hf.keys():  # e.g. mixtral's in-memory "mlp" for on-disk "block_sparse_moe"
        for alias in layout.block_aliases:
            if _LAYER_KEY.match(key) and f".{alias}." in key:
                hf.rename(key, key.replace(f".{alias}.", f".{layout.moe_block}.", 1))
    expected = expected_state(cfg)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, shape in expected.items():
        if name in state:
            continue
        if is_expert_tensor(name):
            layer = name.split(".")[1]
            w_gate_up, w_down = _read_experts(hf, layout, layer, cfg.moe.num_experts, used)
            state[f"layers.{layer}.ffn.experts.w_gate_up"] = w_gate_up
            state[f"layers.{layer}.ffn.experts.w_down"] = w_down
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        key = hf_name(layout, name)
        if key is None:  # softmax routers have no selection bias: megamoe keeps a zero buffer
            state[name] = torch.zeros(shape)
            continue
        if key not in hf:
            raise ValueError(f"{model_type} checkpoint lacks {key!r} (megamoe {name!r})")
        state[name] = hf[key]
        if layout.attention == "mla":
            state[name] = mla_tensor_from_hf(cfg, name, state[name], interleaved)
        used.add(key)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
        used.add("lm_head.weight")  # some tied checkpoints still store it
    check_state(cfg, state, f"{model_type} checkpoint")

    notes, extra_layers = [], set()
    leftover = []
    for key in hf.keys():
        if key in used or key.endswith("rotary_emb.inv_freq"):
            continue
        m = _LAYER_KEY.match(key)
        if m and int(m.group(1)) >= cfg.num_layers:
            extra_layers.add(int(m.group(1)))  # multi-token-prediction layers (DeepSeek / GLM)
            continue
        leftover.append(key)
    if leftover:
        raise ValueError(f"{model_type} checkpoint has {len(leftover)} tensor(s) megamoe cannot "
                         f"place, e.g. {sorted(leftover)[0]!r} (an unsupported feature?)")
    if extra_layers:
        notes.append(f"dropped layers {sorted(extra_layers)} beyond num_hidden_layers "
                     "(multi-token-prediction heads)")
    return state, notes


# ------------------------------------------------------------------------------ directories

def read_hf(src: str, seq_length: int | None = None) -> tuple[str, ModelConfig, dict, list[str]]:
    """(model_type, ModelConfig, megamoe state dict, notes) of an HF model directory."""
    hf_cfg = read_hf_config(src)
    cfg = config_from_hf(hf_cfg)
    if seq_length:
        cfg.seq_length = seq_length
    validate(TrainConfig(model=cfg))
    state, notes = from_hf_state(cfg, HFTensors(src), hf_cfg["model_type"], hf_cfg)
    return hf_cfg["model_type"], cfg, state, notes


def load_any(path: str) -> tuple[ModelConfig, dict, str]:
    """(ModelConfig, state dict, description) of a megamoe checkpoint/out_dir or an HF directory."""
    if os.path.isdir(path) and is_hf_dir(path):
        model_type, cfg, state, _ = read_hf(path)
        return cfg, state, f"Hugging Face {model_type} model"
    cfg, state = load_megamoe_state(path)
    return cfg, state, "megamoe checkpoint"


def _tokenizer_files(spec: str) -> dict[str, str]:
    """{file name in the output: source path} of a tokenizer.json file or tokenizer directory."""
    if os.path.isdir(spec):
        files = {f: os.path.join(spec, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(spec, f))}
        if not files:
            raise ValueError(f"tokenizer directory {spec!r} holds none of {', '.join(TOKENIZER_FILES)}")
        return files
    if os.path.isfile(spec):
        return {"tokenizer.json": spec}
    raise ValueError(f"tokenizer {spec!r} not found: give a tokenizer.json file or a directory")


def _special_ids(tok_json: str | None, vocab_size: int) -> dict:
    """bos/eos ids found in a tokenizer.json (megamoe's EOS detection), checked against the vocab."""
    if tok_json is None:
        return {}
    from megamoe.data.tokenizer import HFTokenizer

    tok = HFTokenizer(tok_json)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary is "
                         f"{vocab_size}")
    return {"eos_token_id": tok.eos_id} if tok.eos_id is not None else {}


def megamoe_to_hf(src: str, dst: str, model_type: str | None = None, tokenizer: str | None = None,
                  max_shard_size: str | int = "5GB", dtype: str = "fp32", overwrite: bool = False,
                  token_ids: dict | None = None) -> list[str]:
    """Write a megamoe checkpoint as an HF model directory; returns notes for the user."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    max_bytes = parse_size(max_shard_size)
    cfg, state = load_megamoe_state(src)
    model_type = model_type or infer_model_type(cfg)
    hf_cfg = config_to_hf(cfg, model_type)
    notes = []
    if cfg.moe is not None and cfg.moe.capacity_factor > 0:
        notes.append(f"the model was trained with capacity_factor {cfg.moe.capacity_factor}; "
                     f"{model_type} routes dropless, so outputs differ where tokens were dropped")
    tensors = to_hf_state(cfg, state, model_type, DTYPES[dtype])
    tok_files = _tokenizer_files(tokenizer) if tokenizer else {}
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    ids.update(_special_ids(tok_files.get("tokenizer.json"), cfg.vocab_size))
    ids.update({k: v for k, v in (token_ids or {}).items() if v is not None})
    for k, v in ids.items():
        if v is not None and not 0 <= v < cfg.vocab_size:
            raise ValueError(f"{k} {v} is outside the vocabulary (size {cfg.vocab_size})")
    hf_cfg.update(ids)
    hf_cfg["dtype"] = DTYPE_NAMES[DTYPES[dtype]]
    gen_cfg = {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}}
    with atomic_dir(dst, overwrite) as tmp:
        shards = save_safetensors(tensors, tmp, max_bytes)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen_cfg, f, indent=2)
        for name, path in tok_files.items():
            shutil.copyfile(path, os.path.join(tmp, name))
        if tok_files and "tokenizer_config.json" not in tok_files and "tokenizer.json" in tok_files:
            # Lets AutoTokenizer load a bare tokenizer.json without guessing a slow tokenizer class.
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                           "model_max_length": cfg.seq_length}, f, indent=2)
    notes.insert(0, f"wrote {dst} ({model_type}, {len(tensors)} tensors in {len(shards)} file(s))")
    return notes


def hf_to_megamoe(src: str, dst: str, seq_length: int | None = None, overwrite: bool = False) -> list[str]:
    """Write an HF model directory as a megamoe out_dir ready for continued training."""
    model_type, cfg, state, notes = read_hf(src, seq_length)
    base = TrainConfig()
    extra = {}
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        extra["tokenizer.json"] = os.path.join(src, "tokenizer.json")
        base.data.tokenizer = os.path.join(os.path.abspath(dst), "tokenizer.json")
    write_megamoe(dst, cfg, state, overwrite=overwrite, extra_files=extra, base=base)
    notes.insert(0, f"wrote {dst} (from {model_type}); continue training with: python -m megamoe "
                    f"train --config {os.path.join(dst, 'config.yaml')} (set data / optim there first)")
    return notes


# ------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamoe convert",
                                     description="convert checkpoints to / from Hugging Face format")
    sub = parser.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("to-hf", help="megamoe checkpoint (or out_dir) -> HF model directory")
    to.add_argument("src", help="megamoe checkpoint directory, or an out_dir (latest checkpoint)")
    to.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    to.add_argument("--model-type", help="olmoe, mixtral, qwen2_moe, glm4_moe, deepseek_v3, llama or "
                    "olmo2 "
                    "(default: inferred from the model config)")
    to.add_argument("--tokenizer", help="tokenizer.json, or a directory of tokenizer files, to copy")
    to.add_argument("--max-shard-size", default="5GB", help="split model.safetensors past this (5GB)")
    to.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    for tok in ("bos", "eos", "pad"):
        to.add_argument(f"--{tok}-token-id", type=int, help=f"{tok} id for config.json")
    to.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    frm = sub.add_parser("from-hf", help="HF model directory -> megamoe out_dir")
    frm.add_argument("src", help="HF model directory (config.json + safetensors)")
    frm.add_argument("dst", help="output out_dir (must not exist unless --overwrite)")
    frm.add_argument("--seq-length", type=int, help="training sequence length "
                     "(default: max_position_embeddings)")
    frm.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.direction == "to-hf":
            notes = megamoe_to_hf(args.src, args.dst, args.model_type, args.tokenizer,
                                  args.max_shard_size, args.dtype, args.overwrite,
                                  {"bos_token_id": args.bos_token_id, "eos_token_id": args.eos_token_id,
                                   "pad_token_id": args.pad_token_id})
        else:
            notes = hf_to_megamoe(args.src, args.dst, args.seq_length, args.overwrite)
    except OSError as err:  # disk full, permissions...: still one line, not a traceback
        raise ValueError(f"{err.strerror or err}: {err.filename}") from None
    for line in notes:
        print(f"megamoe convert: {line}")
    return 0
