"""Dense checkpoint -> MoE (`python -m megamoe upcycle`).

Two ways to build the experts of an upcycled layer from its dense SwiGLU FFN
(gate/up [I, H], down [H, I]):

  copy   sparse upcycling: every expert is a copy of the FFN (expert_hidden = I).
         With weights that sum to 1 over the k chosen experts (router_mode topk_softmax, the
         default here, or norm_topk_prob) the layer returns sum_k w_k FFN(x) = FFN(x): the
         upcycled model reproduces the dense one exactly at initialisation, whatever the router.
         (softmax_topk without renormalisation would scale the FFN by the top-k probability mass.)
  split  LLaMA-MoE neuron splitting: the I intermediate neurons are partitioned into E groups of
         I/E, expert e holds rows P_e of gate/up and columns P_e of down. A SwiGLU FFN is a sum
         over its neurons, so FFN(x) = sum_e expert_e(x) exactly. The MoE output is
         sum_{e chosen} w_e expert_e(x), which equals the dense output when every expert is chosen
         (top_k = E) with weight 1. The default routing here is softmax_topk with
         routed_scaling_factor = E, so a router with uniform probabilities (router_std 0) gives
         every expert exactly weight 1 and top_k = E reproduces the dense model; with top_k < E the
         layer starts as the partial sum over the chosen experts' neurons.
         Partitions: `random` (a seeded permutation) or `kmeans` (balanced k-means on the
         neurons' concatenated gate and up weight rows, seeded).
The new router is N(0, router_std) (default 0.02, seeded); the selection bias starts at 0.
Sources: a megamoe dense checkpoint / out_dir, or a Hugging Face llama / olmo2 directory.
The result is a megamoe out_dir (convert it with `megamoe convert to-hf` afterwards), written
one layer at a time (the source is read lazily, one layer in memory; upcycle_tensors); an HF
source's tokenizer files and special tokens go along. Exporting a split model: no HF type has
softmax top-k with a routed_scaling_factor, so to-hf folds the factor into the experts
(w_down * E; exact for power-of-two E) and writes olmoe (QK-norm models) or qwen2_moe with a
zero shared expert (convert.export_config): same logits in transformers.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import numpy as np
import torch

from megamoe.config import ModelConfig, MoEConfig, TrainConfig, validate
from megamoe.checkpoint.files import WriteError
from megamoe.hf.io import HF_META, is_hf_dir, megamoe_writer, stored_names
from megamoe.model.transformer import is_moe_layer


# --------------------------------------------------------------------------- partitions

def random_partition(num_neurons: int, num_experts: int, seed: int = 0) -> list[np.ndarray]:
    """E sorted index arrays of num_neurons / E neurons each, from a seeded permutation."""
    _check_divisible(num_neurons, num_experts)
    perm = np.random.default_rng(seed).permutation(num_neurons)
    return [np.sort(chunk) for chunk in np.split(perm, num_experts)]


def _balanced_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Give each point its nearest cluster that still has room, closest (point, cluster) pairs
    first, so every cluster ends with exactly `capacity` points."""
    n, k = dist.shape
    labels = np.full(n, -1)
    counts = np.zeros(k, dtype=np.int64)
    assigned = 0
    for flat in np.argsort(dist, axis=None, kind="stable"):
        point, cluster = divmod(int(flat), k)
        if labels[point] < 0 and counts[cluster] < capacity:
            labels[point] = cluster
            counts[cluster] += 1
            assigned += 1
            if assigned == n:
                break
    return labels


def kmeans_partition(features: np.ndarray, num_experts: int, seed: int = 0,
                     iters: int = 25) -> list[np.ndarray]:
    """Balanced k-means over feature rows (one per neuron): E equal-size groups of similar
    neurons. Deterministic for a given seed."""
    n = features.shape[0]
    _check_divisible(n, num_experts)
    x = features.astype(np.float64)
    rng = np.random.default_rng(seed)
    centroids = x[rng.choice(n, num_experts, replace=False)]
    labels = None
    for _ in range(iters):
        # squared distances [N, E] without materialising [N, E, D]
        dist = (x * x).sum(1)[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
        new_labels = _balanced_assign(dist, n // num_experts)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        centroids = np.stack([x[labels == j].mean(0) for j in range(num_experts)])
    return [np.flatnonzero(labels == j) for j in range(num_experts)]


def _check_divisible(num_neurons: int, num_experts: int) -> None:
    if num_neurons % num_experts:
        raise ValueError(f"split mode needs the FFN size ({num_neurons}) to be divisible by "
                         f"--num-experts ({num_experts})")


# ------------------------------------------------------------------------------ upcycling

def upcycle_config(cfg: ModelConfig, num_experts: int, top_k: int, mode: str = "copy",
                   split_method: str = "random", router_mode: str | None = None,
                   norm_topk_prob: bool = False, routed_scaling_factor: float | None = None,
                   router_std: float = 0.02, first_k_dense: int = 0,
                   moe_layer_freq: int = 1) -> ModelConfig:
    """The MoE config of an upcycled dense model (validated), or a ValueError saying why not."""
    if cfg.moe is not None:
        raise ValueError("the source model is already MoE (model.moe is set); upcycling needs a dense one")
    if mode not in ("copy", "split"):
        raise ValueError(f"unknown upcycling mode {mode!r}; use copy or split")
    if split_method not in ("random", "kmeans"):
        raise ValueError(f"unknown split method {split_method!r}; use random or kmeans")
    if cfg.bias:
        raise ValueError("the dense FFN has biases but megamoe experts have none; cannot upcycle")
    if router_std < 0:
        raise ValueError(f"--router-std must be >= 0 (got {router_std})")
    ffn = cfg.ffn_hidden
    if mode == "copy":
        expert_hidden = ffn
        router_mode = router_mode or "topk_softmax"
        routed_scaling_factor = 1.0 if routed_scaling_factor is None else routed_scaling_factor
    else:
        _check_divisible(ffn, num_experts)
        expert_hidden = ffn // num_experts
        router_mode = router_mode or "softmax_topk"
        routed_scaling_factor = float(num_experts) if routed_scaling_factor is None else routed_scaling_factor
    new = copy.deepcopy(cfg)
    new.moe = MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=expert_hidden,
                        router_mode=router_mode, norm_topk_prob=norm_topk_prob,
                        routed_scaling_factor=routed_scaling_factor, first_k_dense=first_k_dense,
                        moe_layer_freq=moe_layer_freq)
    validate(TrainConfig(model=new))
    return new


def upcycle_layer(new: ModelConfig, i: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  mode: str, split_method: str, router_std: float, seed: int,
                  gen: torch.Generator) -> tuple[dict[str, torch.Tensor], list[np.ndarray] | None]:
    """({name: tensor} of the MoE FFN of layer i, its neuron partition in split mode) from the
    dense FFN (gate/up [I, H], down [H, I]); experts keep the FFN's dtype, the router is fp32.
    `gen` draws the routers of successive layers (the same sequence however they are written)."""
    E, ffn, pre = new.moe.num_experts, gate.shape[0], f"layers.{i}.ffn."
    dtype = gate.dtype
    parts = None
    if mode == "copy":
        w_gate_up = torch.cat([gate.t(), up.t()], dim=1).expand(E, -1, -1).clone()
        w_down = down.t().expand(E, -1, -1).clone()
    else:
        if split_method == "random":
            parts = random_partition(ffn, E, seed + i)
        else:
            parts = kmeans_partition(torch.cat([gate, up], dim=1).float().numpy(), E, seed + i)
        idx = [torch.from_numpy(p) for p in parts]
        w_gate_up = torch.stack([torch.cat([gate[p].t(), up[p].t()], dim=1) for p in idx])
        w_down = torch.stack([down[:, p].t() for p in idx])
    out = {pre + "experts.w_gate_up": w_gate_up.to(dtype).contiguous(),     # [E, H, 2I_e]
           pre + "experts.w_down": w_down.to(dtype).contiguous(),           # [E, I_e, H]
           pre + "router.weight": torch.randn(E, new.d_model, generator=gen) * router_std,
           pre + "router.expert_bias": torch.zeros(E)}
    return out, parts


_FFN = ("gate_proj", "up_proj", "down_proj")


def upcycle_tensors(new: ModelConfig, state, mode: str = "copy", split_method: str = "random",
                    router_std: float = 0.02, seed: int = 0, partitions: dict | None = None):
    """(name, tensor) of the upcycled model, in model order, from a dense state: a dict or a lazy
    reader (convert.open_model_state; released after every layer, so one layer is in memory).
    A tied head is not yielded (it is the embedding: read and written once)."""
    gen = torch.Generator().manual_seed(seed)
    names = stored_names(new, state.names if hasattr(state, "names") else state)
    release = getattr(state, "release", lambda: None)
    for i in range(new.num_layers):
        if is_moe_layer(new, i):
            pre = f"layers.{i}.ffn."
            missing = [n for n in _FFN if pre + n + ".weight" not in names]
            if missing:
                raise ValueError(f"the dense checkpoint lacks the FFN of layer {i}")
    layer = None
    for name in names:
        m = name.split(".")
        if m[0] == "layers" and int(m[1]) != layer:
            release()
            layer = int(m[1])
            if is_moe_layer(new, layer):
                pre = f"layers.{layer}.ffn."
                gate, up, down = (state[pre + n + ".weight"] for n in _FFN)
                tensors, parts = upcycle_layer(new, layer, gate, up, down, mode, split_method,
                                               router_std, seed, gen)
                del gate, up, down
                if parts is not None and partitions is not None:
                    partitions[layer] = parts
                yield from tensors.items()
        if m[0] == "layers" and is_moe_layer(new, int(m[1])) and m[2] == "ffn":
            continue            # the dense FFN, replaced above
        yield name, state[name]
    release()


def upcycle(cfg: ModelConfig, state: dict, num_experts: int, top_k: int, mode: str = "copy",
            split_method: str = "random", router_mode: str | None = None,
            norm_topk_prob: bool = False, routed_scaling_factor: float | None = None,
            router_std: float = 0.02, first_k_dense: int = 0, moe_layer_freq: int = 1,
            seed: int = 0) -> tuple[ModelConfig, dict, dict[int, list[np.ndarray]]]:
    """(MoE config, MoE state dict, {layer: neuron partition} in split mode) of a dense model
    held in memory (the CLI streams instead: upcycle_tensors over a lazy reader)."""
    new = upcycle_config(cfg, num_experts, top_k, mode, split_method, router_mode, norm_topk_prob,
                         routed_scaling_factor, router_std, first_k_dense, moe_layer_freq)
    partitions: dict[int, list[np.ndarray]] = {}
    out = dict(upcycle_tensors(new, state, mode, split_method, router_std, seed, partitions))
    if new.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return new, out, partitions


# ------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megamoe upcycle",
                                description="dense checkpoint -> MoE (sparse upcycling / neuron splitting)")
    p.add_argument("src", help="megamoe dense checkpoint / out_dir, or an HF llama / olmo2 directory")
    p.add_argument("dst", help="output megamoe out_dir (must not exist unless --overwrite)")
    p.add_argument("--num-experts", type=int, required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("--mode", default="copy", choices=["copy", "split"],
                   help="copy: every expert = the FFN; split: partition the FFN's neurons")
    p.add_argument("--split-method", default="random", choices=["random", "kmeans"])
    p.add_argument("--router-mode", choices=["softmax_topk", "topk_softmax", "sigmoid_bias"],
                   help="default: topk_softmax (copy), softmax_topk (split)")
    p.add_argument("--norm-topk-prob", action="store_true")
    p.add_argument("--routed-scaling-factor", type=float,
                   help="default: 1 (copy), num_experts (split)")
    p.add_argument("--router-std", type=float, default=0.02, help="std of the new router (0: uniform)")
    p.add_argument("--first-k-dense", type=int, default=0, help="keep the first k layers dense")
    p.add_argument("--moe-layer-freq", type=int, default=1, help="upcycle every n-th layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv: list[str]) -> int:
    from megamoe.hf.convert import open_model_state
    from megamoe.hf.tokens import hf_side

    args = build_parser().parse_args(argv)
    try:
        st = open_model_state(args.src)
        new = upcycle_config(st.cfg, args.num_experts, args.top_k, args.mode, args.split_method,
                             args.router_mode, args.norm_topk_prob, args.routed_scaling_factor,
                             args.router_std, args.first_k_dense, args.moe_layer_freq)
        extra, base, text = {}, TrainConfig(), {}
        if is_hf_dir(args.src):       # keep the tokenizer and special tokens for to-hf
            extra, meta = hf_side(args.src, st.hf_config)
            meta["model_type"] = None          # an MoE now: to-hf picks the type
            text[HF_META] = json.dumps(meta, indent=2)
            if "tokenizer.json" in extra:
                base.data.tokenizer = os.path.join(os.path.abspath(args.dst), "tokenizer.json")
        with megamoe_writer(args.dst, new, args.overwrite, base, extra_files=extra, extra_text=text) as w:
            for name, t in upcycle_tensors(new, st, args.mode, args.split_method, args.router_std,
                                           args.seed):
                w.add(name, t)
    except WriteError:
        raise
    except OSError as err:
        raise ValueError(f"{err.strerror or err}: {err.filename}") from None
    moe = new.moe
    print(f"megamoe upcycle: wrote {args.dst} from a {st.what}: {moe.num_experts} experts "
          f"(top-{moe.top_k}, {args.mode}, expert_hidden {moe.expert_hidden}, router {moe.router_mode}, "
          f"routed_scaling_factor {moe.routed_scaling_factor:g})")
    return 0
