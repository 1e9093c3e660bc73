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
The result is a megamoe out_dir (convert it with `megamoe convert to-hf` afterwards).
"""

from __future__ import annotations

import argparse
import copy
import os

import numpy as np
import torch

from megamoe.config import ModelConfig, MoEConfig, TrainConfig, validate
from megamoe.hf.io import is_hf_dir, write_megamoe
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

def upcycle(cfg: ModelConfig, state: dict, num_experts: int, top_k: int, mode: str = "copy",
            split_method: str = "random", router_mode: str | None = None,
            norm_topk_prob: bool = False, routed_scaling_factor: float | None = None,
            router_std: float = 0.02, first_k_dense: int = 0, moe_layer_freq: int = 1,
            seed: int = 0) -> tuple[ModelConfig, dict, dict[int, list[np.ndarray]]]:
    """(MoE config, MoE state dict, {layer: neuron partition} in split mode) of a dense model."""
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

    gen = torch.Generator().manual_seed(seed)
    out = {k: v for k, v in state.items()}
    partitions: dict[int, list[np.ndarray]] = {}
    for i in range(cfg.num_layers):
        if not is_moe_layer(new, i):
            continue
        pre = f"layers.{i}.ffn."
        try:
            gate, up, down = (out.pop(pre + n + ".weight") for n in ("gate_proj", "up_proj", "down_proj"))
        except KeyError:
            raise ValueError(f"the dense checkpoint lacks the FFN of layer {i}") from None
        gate, up, down = gate.float(), up.float(), down.float()     # [I, H], [I, H], [H, I]
        if mode == "copy":
            w_gate_up = torch.cat([gate.t(), up.t()], dim=1).expand(num_experts, -1, -1).clone()
            w_down = down.t().expand(num_experts, -1, -1).clone()
        else:
            if split_method == "random":
                parts = random_partition(ffn, num_experts, seed + i)
            else:
                parts = kmeans_partition(torch.cat([gate, up], dim=1).numpy(), num_experts, seed + i)
            partitions[i] = parts
            idx = [torch.from_numpy(p) for p in parts]
            w_gate_up = torch.stack([torch.cat([gate[p].t(), up[p].t()], dim=1) for p in idx])
            w_down = torch.stack([down[:, p].t() for p in idx])
        out[pre + "experts.w_gate_up"] = w_gate_up.contiguous()      # [E, H, 2I_e]
        out[pre + "experts.w_down"] = w_down.contiguous()            # [E, I_e, H]
        out[pre + "router.weight"] = torch.randn(num_experts, cfg.d_model, generator=gen) * router_std
        out[pre + "router.expert_bias"] = torch.zeros(num_experts)
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
    from megamoe.hf.convert import load_any

    args = build_parser().parse_args(argv)
    try:
        cfg, state, what = load_any(args.src)
        new, out, _ = upcycle(cfg, state, args.num_experts, args.top_k, args.mode, args.split_method,
                              args.router_mode, args.norm_topk_prob, args.routed_scaling_factor,
                              args.router_std, args.first_k_dense, args.moe_layer_freq, args.seed)
        extra, base = {}, TrainConfig()
        tok = os.path.join(args.src, "tokenizer.json")
        if is_hf_dir(args.src) and os.path.isfile(tok):
            extra["tokenizer.json"] = tok
            base.data.tokenizer = os.path.join(os.path.abspath(args.dst), "tokenizer.json")
        write_megamoe(args.dst, new, out, overwrite=args.overwrite, extra_files=extra, base=base)
    except OSError as err:
        raise ValueError(f"{err.strerror or err}: {err.filename}") from None
    moe = new.moe
    print(f"megamoe upcycle: wrote {args.dst} from a {what}: {moe.num_experts} experts "
          f"(top-{moe.top_k}, {args.mode}, expert_hidden {moe.expert_hidden}, router {moe.router_mode}, "
          f"routed_scaling_factor {moe.routed_scaling_factor:g})")
    return 0
