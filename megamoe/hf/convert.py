"""megamoe <-> Hugging Face checkpoint conversion (`python -m megamoe convert`), streaming.

  megamoe convert to-hf   SRC DST [--model-type olmoe] [--tokenizer DIR] [--max-shard-size 5GB]
                                  [--dtype bf16]
  megamoe convert from-hf SRC DST [--seq-length 4096] [--dtype bf16] [--max-shard-size 2GB]

to-hf: SRC is a megamoe checkpoint directory (any format) or an out_dir (its latest checkpoint);
DST gets config.json, generation_config.json, model.safetensors (sharded + index past
--max-shard-size) and the tokenizer files (--tokenizer, or those from-hf kept in the out_dir).
Expert weights are written per expert, the layout transformers' save_pretrained writes and
from_pretrained reads.
from-hf: SRC is an HF model directory (per-expert keys, or the fused transformers 5.x
`experts.gate_up_proj` / `experts.down_proj` tensors); DST becomes a megamoe out_dir that
`python -m megamoe train --config DST/config.yaml` continues from, its weights in the
model-only sharded format (megamoe.checkpoint.weights) that any parallel layout loads with each
rank reading only its slices. The tokenizer files, special token ids and generation config go
along (io.HF_META) and come back out of to-hf.

Memory: both directions work one layer at a time, reading one tensor at a time (no mmap of
whole files) and writing each output shard as it fills: peak ~ one output shard + one layer's
tensors, whatever the model size (benchmarks/convert_memory.py). Dtypes are the source's
(bf16 stays bf16) unless --dtype says otherwise; the tensors the HF model keeps in fp32 stay
fp32 (the router selection bias, and the router weight of deepseek_v3 / glm4_moe), so a bf16
round trip is byte-identical.

Export of routed scaling (e.g. split-upcycled models, upcycle.py: softmax top-k, no
renormalisation, routed_scaling_factor E): only the sigmoid types have the factor, so for the
others it is folded into the experts (w_down * factor, exact: the expert output is linear in
w_down) and the model exports as olmoe (QK-norm) or qwen2_moe; qwen2_moe always has a gated
shared expert, so a model without one gets a zero shared expert (down_proj 0: adds exactly 0).
Model types and what each one refuses: megamoe/hf/layouts.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re

import torch

from megamoe.config import ModelConfig, TrainConfig, validate
from megamoe.checkpoint.files import WriteError, atomic_dir, write_json
from megamoe.hf import tokens as tok
from megamoe.hf.fp8 import DequantizedTensors, fp8_block_size
from megamoe.hf.io import (HF_META, HFTensors, MegamoeState, check_state, expected_state, is_hf_dir,
                           megamoe_writer, parse_size, read_hf_config, read_hf_meta, save_safetensors,
                           stored_names)
from megamoe.hf.layouts import (LAYOUTS, config_from_hf, config_to_hf, expert_keys, fused_expert_keys,
                                get_layout, hf_name, infer_model_type, is_expert_tensor,
                                mtp_layer_count)
from megamoe.hf.layouts_deepseek import empty_shared_expert_tensors, mla_tensor_from_hf, mla_tensor_to_hf

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

def keep_fp32(layout, name: str, key: str) -> bool:
    """Whether the HF model keeps this tensor (megamoe `name`, HF `key`) fp32 whatever the
    checkpoint dtype (transformers' _keep_in_fp32_modules_strict, Layout.keep_fp32: DeepSeek
    routers); the router selection bias always."""
    return name.endswith("router.expert_bias") or key.endswith(layout.keep_fp32)


def _cast(t: torch.Tensor, dtype: torch.dtype | None, fp32: bool) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    if fp32:
        return t.float()
    return t if dtype is None else t.to(dtype)


def _layer_of(name: str) -> str | None:
    m = re.match(r"^layers\.(\d+)\.", name)
    return m.group(1) if m else None


def by_layer(names):
    """Names grouped by layer (the embedding, each layer, the head), in order."""
    group, current = [], object()
    for name in names:
        layer = _layer_of(name)
        if group and layer != current:
            yield group
            group = []
        current = layer
        group.append(name)
    if group:
        yield group


# --------------------------------------------------------------------------- megamoe -> HF

def tensor_to_hf(cfg: ModelConfig, layout, name: str, t: torch.Tensor,
                 dtype: torch.dtype | None = None):
    """(HF name, tensor) pairs of one megamoe tensor (per-expert layout); `dtype` casts floating
    tensors except those the HF model keeps fp32."""
    if is_expert_tensor(name):
        layer = name.split(".")[1]
        t = _cast(t, dtype, False)
        if name.endswith("w_gate_up"):            # [E, H, 2I] -> per expert [I, H] x 2
            inter = t.shape[-1] // 2
            for e in range(t.shape[0]):
                gate, up, _ = expert_keys(layout, layer, e)
                yield gate, t[e, :, :inter].t().contiguous()
                yield up, t[e, :, inter:].t().contiguous()
        else:                                      # [E, I, H] -> per expert [H, I]
            for e in range(t.shape[0]):
                yield expert_keys(layout, layer, e)[2], t[e].t().contiguous()
        return
    if name == "lm_head.weight" and cfg.tie_embeddings:
        return  # HF stores tied weights once, as embed_tokens
    key = hf_name(layout, name)
    if key is None:
        return  # a softmax router's selection bias: unused by megamoe, absent in HF
    if layout.attention == "mla":
        t = mla_tensor_to_hf(cfg, name, t)  # rotary rows in DeepSeek's interleaved order
    yield key, _cast(t, dtype, keep_fp32(layout, name, key)).contiguous()


def to_hf_state(cfg: ModelConfig, state: dict, model_type: str,
                dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF tensors (per-expert layout) of a whole megamoe state dict."""
    layout = get_layout(model_type)
    check_state(cfg, state, "megamoe checkpoint")
    return {k: v for name, t in state.items() for k, v in tensor_to_hf(cfg, layout, name, t, dtype)}


def export_config(cfg: ModelConfig, model_type: str | None) -> tuple[ModelConfig, str, float, list[str]]:
    """(config as exported, model type, factor folded into w_down, notes). A config the type
    takes as is exports as is; otherwise routed scaling of a non-sigmoid router is folded into
    the experts, and a qwen2_moe export without shared experts gets a zero one (module docstring)."""
    first = model_type or infer_model_type(cfg)
    try:
        config_to_hf(cfg, first)
        return cfg, first, 1.0, []
    except ValueError as err:
        refusal = err
    out, scale, notes = copy.deepcopy(cfg), 1.0, []
    moe = out.moe
    if moe is None:
        raise refusal
    if moe.router_mode != "sigmoid_bias" and moe.routed_scaling_factor != 1.0:
        scale, moe.routed_scaling_factor = float(moe.routed_scaling_factor), 1.0
        notes.append(f"folded routed_scaling_factor {scale:g} into the experts' down_proj")
    model_type = model_type or infer_model_type(out)
    if (model_type == "mixtral" and moe.router_mode == "softmax_topk" and not moe.norm_topk_prob
            and not out.qk_norm):
        model_type = "qwen2_moe"   # softmax top-k without renormalisation and without QK-norm
    if model_type == "qwen2_moe" and moe.num_shared_experts == 0:
        moe.num_shared_experts, moe.shared_expert_hidden, moe.shared_expert_gate = 1, 1, True
        notes.append("qwen2_moe always has a shared expert: wrote a zero one (adds exactly 0)")
    try:
        config_to_hf(out, model_type)
    except ValueError:
        raise refusal from None
    return out, model_type, scale, notes


def _hf_tensors(state: MegamoeState, out_cfg: ModelConfig, layout, scale: float,
                dtype: torch.dtype | None):
    """(HF name, tensor) of the whole model, one layer in memory at a time."""
    shapes = expected_state(out_cfg)
    added = [n for n in shapes if n not in state.names]                   # the zero shared expert
    for group in by_layer(stored_names(out_cfg, list(state.names) + added)):
        for name in group:
            if name in state.names:
                t = state[name]
                if scale != 1.0 and name.endswith("experts.w_down"):
                    t.mul_(scale)
            else:
                t = torch.zeros(shapes[name], dtype=dtype or state.dtype("embed.weight"))
            yield from tensor_to_hf(out_cfg, layout, name, t, dtype)
        state.release()
    # DeepSeek-style types without shared experts: transformers builds zero-width shared MLPs
    # and expects their (empty) weights in the checkpoint
    for key, t in empty_shared_expert_tensors(out_cfg, layout).items():
        yield key, t.to(dtype or state.dtype("embed.weight"))


def megamoe_to_hf(src: str, dst: str, model_type: str | None = None, tokenizer: str | None = None,
                  max_shard_size: str | int = "5GB", dtype: str | None = None, overwrite: bool = False,
                  token_ids: dict | None = None) -> list[str]:
    """Write a megamoe checkpoint as an HF model directory; returns notes for the user."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    max_bytes = parse_size(max_shard_size)
    state = MegamoeState(src)
    cfg = state.cfg
    meta, meta_dir = read_hf_meta(src)
    if model_type is None and meta.get("model_type"):
        try:
            export_config(cfg, meta["model_type"])
            model_type = meta["model_type"]        # the type it came from, when it still fits
        except ValueError:
            pass
    out_cfg, model_type, scale, notes = export_config(cfg, model_type)
    layout = get_layout(model_type)
    hf_cfg = config_to_hf(out_cfg, model_type)
    if cfg.moe is not None and cfg.moe.capacity_factor > 0:
        notes.append(f"the model was trained with capacity_factor {cfg.moe.capacity_factor}; "
                     f"{model_type} routes dropless, so outputs differ where tokens were dropped")
    tok_files = tok.tokenizer_files(tokenizer) if tokenizer else tok.kept_files(meta, meta_dir)
    ids = tok.special_ids(meta, tok_files, cfg.vocab_size, token_ids)
    hf_cfg.update(ids)
    out_dtype = DTYPES[dtype] if dtype else state.dtype("embed.weight")
    hf_cfg["dtype"] = DTYPE_NAMES.get(out_dtype, "float32")
    with atomic_dir(dst, overwrite) as tmp:
        tensors = _hf_tensors(state, out_cfg, layout, scale, DTYPES[dtype] if dtype else None)
        shards = save_safetensors(tensors, tmp, max_bytes)
        write_json(os.path.join(tmp, "config.json"), hf_cfg, indent=2)
        write_json(os.path.join(tmp, "generation_config.json"), tok.generation_config(meta, ids, token_ids),
                   indent=2)
        tok.write_tokenizer(tmp, tok_files, ids, cfg.seq_length)
    notes.insert(0, f"wrote {dst} ({model_type}, {len(shards)} safetensors file(s))")
    return notes


# --------------------------------------------------------------------------- HF -> megamoe

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

    def dtype(self, name):
        return self._t[name].dtype

    def release(self):
        pass


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


class HFState:
    """Lazy, read-only {megamoe name: tensor} of HF tensors (an HF directory, an HFTensors or a
    dict): the MegamoeState interface (cfg, names, state[name], dtype, release). Everything that
    can be checked without reading weights is checked here, before anything is written: missing
    tensors, tensors megamoe cannot place, layers beyond num_hidden_layers."""

    def __init__(self, cfg: ModelConfig, tensors, model_type: str, hf_config: dict | None = None,
                 dtype: torch.dtype | None = None):
        self.cfg, self.model_type, self.cast, self.hf_config = cfg, model_type, dtype, hf_config
        self.layout = layout = get_layout(model_type)
        self.what = f"Hugging Face {model_type} model"
        self.interleaved = (hf_config or {}).get("rope_interleave", True) is not False
        self.hf = hf = _DictTensors(tensors) if isinstance(tensors, dict) else tensors
        for key in hf.keys():  # e.g. mixtral's in-memory "mlp" for on-disk "block_sparse_moe"
            for alias in layout.block_aliases:
                if _LAYER_KEY.match(key) and f".{alias}." in key:
                    hf.rename(key, key.replace(f".{alias}.", f".{layout.moe_block}.", 1))
        self.names = expected_state(cfg)
        self.notes: list[str] = []
        self._sources = {name: self._keys(name) for name in self.names}
        self._check_leftovers()

    def _keys(self, name: str) -> list[str]:
        """The HF tensors `name` is made of (empty: a zero buffer, or the tied head)."""
        layout, hf = self.layout, self.hf
        if is_expert_tensor(name):
            layer = name.split(".")[1]
            fused = fused_expert_keys(layout, layer)
            if all(k in hf for k in fused):
                return [fused[0] if name.endswith("w_gate_up") else fused[1]]
            keys = []
            for e in range(self.cfg.moe.num_experts):
                for k in expert_keys(layout, layer, e):
                    if k not in hf:
                        raise ValueError(f"{self.model_type} checkpoint lacks {k!r} (expert {e} of "
                                         f"layer {layer})")
                gate, up, down = expert_keys(layout, layer, e)
                keys += [gate, up] if name.endswith("w_gate_up") else [down]
            return keys
        if name == "lm_head.weight" and self.cfg.tie_embeddings:
            return []
        key = hf_name(layout, name)
        if key is None:
            return []
        if key not in hf:
            raise ValueError(f"{self.model_type} checkpoint lacks {key!r} (megamoe {name!r})")
        return [key]

    def _check_leftovers(self) -> None:
        used = {k for keys in self._sources.values() for k in keys}
        used.update(empty_shared_expert_tensors(self.cfg, self.layout))   # [0, H]: nothing to place
        if self.cfg.tie_embeddings:
            used.add("lm_head.weight")  # some tied checkpoints still store it
        leftover, extra_layers = [], set()
        for key in self.hf.keys():
            if key in used or key.endswith("rotary_emb.inv_freq"):
                continue
            m = _LAYER_KEY.match(key)
            if m and int(m.group(1)) >= self.cfg.num_layers:
                extra_layers.add(int(m.group(1)))
                continue
            leftover.append(key)
        if leftover:
            raise ValueError(f"{self.model_type} checkpoint has {len(leftover)} tensor(s) megamoe "
                             f"cannot place, e.g. {sorted(leftover)[0]!r} (an unsupported feature?)")
        declared = mtp_layer_count(self.layout, self.hf_config)     # 0: not stated
        mtp = self.layout.mtp_layers is not None
        beyond = [i for i in extra_layers if declared and i >= self.cfg.num_layers + declared]
        if extra_layers and (not mtp or beyond):
            raise ValueError(f"the {self.model_type} checkpoint holds layers {sorted(extra_layers)} but "
                             f"config.json declares num_hidden_layers {self.cfg.num_layers}"
                             + (f" and {declared} multi-token-prediction layer(s)" if mtp else "")
                             + "; fix config.json (weights would be dropped)")
        if extra_layers:
            self.notes.append(f"dropped layers {sorted(extra_layers)} beyond num_hidden_layers "
                              "(multi-token-prediction heads)")

    def dtype(self, name: str) -> torch.dtype:
        keys = self._sources.get(name) or self._sources["embed.weight"]
        return self.hf.dtype(keys[0])

    def __getitem__(self, name: str) -> torch.Tensor:
        keys, cfg = self._sources[name], self.cfg
        if name == "lm_head.weight" and cfg.tie_embeddings:
            return self["embed.weight"]
        if not keys:       # softmax routers have no selection bias: megamoe keeps a zero buffer
            return torch.zeros(self.names[name])
        if is_expert_tensor(name):
            t = self._experts(name, keys)
        else:
            t = self.hf[keys[0]]
            if self.layout.attention == "mla":
                t = mla_tensor_from_hf(cfg, name, t, self.interleaved)
        return _cast(t, self.cast, keep_fp32(self.layout, name, keys[0])).contiguous()

    def _experts(self, name: str, keys: list[str]) -> torch.Tensor:
        """w_gate_up [E, H, 2I] / w_down [E, I, H], filled one expert at a time."""
        if len(keys) == 1:                          # fused [E, 2I, H] / [E, H, I]
            return self.hf[keys[0]].transpose(1, 2).contiguous()
        out = None
        for i, key in enumerate(keys):
            w = self.hf[key]
            if out is None:
                out = torch.empty(self.names[name], dtype=w.dtype)
            if name.endswith("w_gate_up"):
                e, half = divmod(i, 2)
                inter = w.shape[0]
                out[e, :, half * inter:(half + 1) * inter] = w.t()
            else:
                out[i] = w.t()
        return out

    def release(self) -> None:
        self.hf.release()


def from_hf_state(cfg: ModelConfig, tensors, model_type: str,
                  hf_config: dict | None = None) -> tuple[dict, list[str]]:
    """(megamoe state dict, notes) from HF tensors (an HFTensors or a plain dict); `hf_config`
    (config.json) says how deepseek_v3 stores its rotary rows (rope_interleave, default true)."""
    st = HFState(cfg, tensors, model_type, hf_config)
    return whole_state(st), st.notes


def whole_state(st) -> dict:
    """Every tensor of a lazy state (HFState, io.MegamoeState) in memory; the tied head is the
    embedding tensor itself, as in a model's state dict."""
    state = {name: st[name] for name in stored_names(st.cfg, st.names)}
    if st.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state


# ------------------------------------------------------------------------------ directories

def open_hf(src: str, seq_length: int | None = None, dtype: str | None = None) -> HFState:
    """The lazy megamoe view of an HF model directory (config translated and validated)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16")
    hf_cfg = read_hf_config(src)
    cfg = config_from_hf(hf_cfg)
    if seq_length:
        cfg.seq_length = seq_length
    validate(TrainConfig(model=cfg))
    tensors = HFTensors(src)
    block = fp8_block_size(hf_cfg)
    if block is not None:   # DeepSeek-V3's FP8 release: dequantized as read (bf16 unless --dtype)
        tensors = DequantizedTensors(tensors, block, DTYPES[dtype] if dtype else torch.bfloat16)
    return HFState(cfg, tensors, hf_cfg["model_type"], hf_cfg, DTYPES[dtype] if dtype else None)


def open_model_state(path: str):
    """Lazy {name: tensor} reader of a megamoe checkpoint / out_dir or an HF directory:
    `.cfg`, `.what`, `.names` (model order, shapes), `state[name]` (a fresh full tensor),
    `.release()` (close the files read so far; call it per layer). See io.MegamoeState."""
    if os.path.isdir(path) and is_hf_dir(path):
        return open_hf(path)
    return MegamoeState(path)


def read_hf(src: str, seq_length: int | None = None) -> tuple[str, ModelConfig, dict, list[str]]:
    """(model_type, ModelConfig, megamoe state dict, notes) of an HF model directory (whole)."""
    st = open_hf(src, seq_length)
    return st.model_type, st.cfg, whole_state(st), st.notes


def hf_to_megamoe(src: str, dst: str, seq_length: int | None = None, overwrite: bool = False,
                  dtype: str | None = None, max_shard_size: str | int = "2GB") -> list[str]:
    """Write an HF model directory as a megamoe out_dir ready for continued training."""
    st = open_hf(src, seq_length, dtype)
    base = TrainConfig()
    extra, meta = tok.hf_side(src, st.hf_config)
    if "tokenizer.json" in extra:
        base.data.tokenizer = os.path.join(os.path.abspath(dst), "tokenizer.json")
    with megamoe_writer(dst, st.cfg, overwrite, base, extra_files=extra, max_shard_size=max_shard_size,
                        extra_text={HF_META: json.dumps(meta, indent=2)}) as w:
        for group in by_layer(stored_names(st.cfg, st.names)):
            for name in group:
                w.add(name, st[name])
            st.release()
    notes = [f"wrote {dst} (from {st.model_type}); continue training with: python -m megamoe "
             f"train --config {os.path.join(dst, 'config.yaml')} (set data / optim there first)"]
    return notes + st.notes


# ------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamoe convert",
                                     description="convert checkpoints to / from Hugging Face format")
    sub = parser.add_subparsers(dest="direction", required=True)
    to = sub.add_parser("to-hf", help="megamoe checkpoint (or out_dir) -> HF model directory")
    to.add_argument("src", help="megamoe checkpoint directory, or an out_dir (latest checkpoint)")
    to.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    to.add_argument("--model-type", help=f"{', '.join(LAYOUTS)} (default: the type it was imported "
                    "from, else inferred from the config)")
    to.add_argument("--tokenizer", help="tokenizer.json, or a directory of tokenizer files, to copy "
                    "(default: the files from-hf kept in the out_dir)")
    to.add_argument("--max-shard-size", default="5GB", help="split model.safetensors past this (5GB)")
    to.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                    help="cast the weights (default: keep the checkpoint's dtypes)")
    for t in ("bos", "eos", "pad"):
        to.add_argument(f"--{t}-token-id", type=int, help=f"{t} id for config.json")
    to.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    frm = sub.add_parser("from-hf", help="HF model directory -> megamoe out_dir")
    frm.add_argument("src", help="HF model directory (config.json + safetensors)")
    frm.add_argument("dst", help="output out_dir (must not exist unless --overwrite)")
    frm.add_argument("--seq-length", type=int, help="training sequence length "
                     "(default: max_position_embeddings)")
    frm.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                     help="cast the weights (default: keep the HF dtypes)")
    frm.add_argument("--max-shard-size", default="2GB", help="size of the weight files (2GB)")
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
            notes = hf_to_megamoe(args.src, args.dst, args.seq_length, args.overwrite, args.dtype,
                                  args.max_shard_size)
    except WriteError:
        raise           # already one line naming the file
    except OSError as err:  # permissions, a vanished file...: still one line, not a traceback
        raise ValueError(f"{err.strerror or err}: {err.filename}") from None
    for line in notes:
        print(f"megamoe convert: {line}")
    return 0
