"""Routing analysis of a trained MoE checkpoint: where do tokens go?

    python -m megamoe analyze-routing runs/tiny --tokens-npy code.npy prose.npy --out routing/
    python tools/analyze_routing.py runs/olmoe/checkpoints/step_00010000 \
        --data data/wiki_text_document data/github_text_document --num-tokens 65536

Runs forward passes over tokens of one or more datasets ("domains"), records every MoE layer's
top-k choices (a forward hook on the router), and writes into --out:
  expert_load.png            layers x experts heatmap: share of token-slots / uniform share (1 = balanced)
  coactivation.png           per selected layer: P(expert j chosen | expert i chosen) for the same token
  domain_specialization.png  per selected layer: share of each domain's tokens routed to each expert
                             vs the uniform k/E (the OLMoE paper's domain-specialisation view)
  loss_curve.png             loss / val loss / aux losses over steps, from the run's metrics.jsonl
  routing_summary.json       all the numbers behind the plots
Needs matplotlib (pip install matplotlib). Runs on CPU unless --device says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np
import torch
import yaml

from megamoe.config import TrainConfig, from_dict
from megamoe.checkpoint import files as ckpt_files
from megamoe.checkpoint import find_checkpoint
from megamoe.checkpoint.consolidate import consolidate


# ----------------------------------------------------------------------------------- checkpoint

def load_checkpoint_model(path: str, device: str = "cpu"):
    """(model in eval mode, TrainConfig, checkpoint dir, step) from a megamoe checkpoint."""
    from megamoe.model.transformer import build_model
    ckpt_dir = find_checkpoint(path)
    ckpt_files.verify(ckpt_dir)
    with open(os.path.join(ckpt_dir, "config.yaml")) as f:
        cfg = from_dict(TrainConfig, yaml.safe_load(f) or {})
    if cfg.model.moe is None:
        raise ValueError(f"checkpoint {ckpt_dir!r} is a dense model (model.moe is null): nothing to route")
    model = build_model(cfg.model)
    state = consolidate(ckpt_dir)   # any format or parallel layout
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which the model lacks"
        raise ValueError(f"checkpoint {ckpt_dir!r} does not match the model its config.yaml describes: "
                         f"it {what} ({len(missing)} missing, {len(unexpected)} unexpected)")
    step = None
    if os.path.exists(os.path.join(ckpt_dir, "trainer.pt")):
        step = int(ckpt_files.load_file(ckpt_dir, "trainer.pt")["step"])
    return model.to(device).eval(), cfg, ckpt_dir, step


# ----------------------------------------------------------------------------------------- data

def tokens_from_npy(path: str, num_tokens: int, seq_length: int) -> np.ndarray:
    """[N, seq_length] int64 from a .npy of token ids: 1-D (a stream) or 2-D (rows = sequences)."""
    if not os.path.exists(path):
        raise ValueError(f"token file {path!r} not found")
    arr = np.load(path)
    if arr.ndim == 2:
        if arr.shape[1] < seq_length:
            raise ValueError(f"{path!r} has rows of {arr.shape[1]} tokens, fewer than seq length {seq_length}")
        arr = arr[:, :seq_length].reshape(-1)
    elif arr.ndim != 1:
        raise ValueError(f"{path!r} must hold a 1-D token stream or a 2-D [sequences, tokens] array")
    return _windows(arr, num_tokens, seq_length, path)


def tokens_from_indexed(prefix: str, num_tokens: int, seq_length: int, seed: int = 0) -> np.ndarray:
    """[N, seq_length] from documents of an indexed dataset, taken in a seeded random order so a
    sample of a large corpus is not just its first files."""
    from megamoe.data.indexed import IndexedDataset
    ds = IndexedDataset(prefix)
    order = np.random.default_rng(seed).permutation(len(ds))
    parts, have = [], 0
    for i in order:
        doc = np.asarray(ds[int(i)])
        parts.append(doc)
        have += doc.size
        if have >= num_tokens:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return _windows(stream, num_tokens, seq_length, prefix)


def _windows(stream: np.ndarray, num_tokens: int, seq_length: int, name: str) -> np.ndarray:
    n = min(num_tokens, stream.size) // seq_length
    if n == 0:
        raise ValueError(f"{name!r} has {stream.size} tokens, fewer than one sequence of {seq_length}")
    return stream[: n * seq_length].astype(np.int64).reshape(n, seq_length)


# -------------------------------------------------------------------------------------- routing

def moe_layer_indices(model) -> list[tuple[int, torch.nn.Module]]:
    """(transformer layer index, MoELayer) for every MoE layer, in depth order."""
    from megamoe.moe.layer import MoELayer
    out = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            m = re.search(r"layers\.(\d+)\.", name + ".")
            out.append((int(m.group(1)) if m else len(out), module))
    return sorted(out, key=lambda t: t[0])


@torch.no_grad()
def collect_routing(model, tokens: np.ndarray, batch_size: int = 8, device: str = "cpu") -> dict:
    """Run `tokens` [N, S] through the model; per MoE layer, count expert choices.

    Returns {"layers": [layer ids], "tokens": N*S, "top_k": k, "num_experts": E,
             "counts": int64[L, E] (token-slots per expert), "coact": int64[L, E, E]}
    coact[l, i, j] = tokens whose top-k at layer l holds both i and j (diagonal = counts).
    """
    layers = moe_layer_indices(model)
    if not layers:
        raise ValueError("the model has no MoE layers")
    num_experts, top_k = layers[0][1].cfg.num_experts, layers[0][1].cfg.top_k
    counts = torch.zeros(len(layers), num_experts, dtype=torch.int64)
    coact = torch.zeros(len(layers), num_experts, num_experts, dtype=torch.int64)

    def hook(li):
        def record(module, inputs, out):
            idx = out.topk_idx.reshape(-1, out.topk_idx.shape[-1]).cpu()      # [T, K]
            chosen = torch.zeros(idx.shape[0], num_experts, dtype=torch.float64)
            chosen.scatter_(1, idx, 1.0)                                          # [T, E] 0/1
            counts[li] += chosen.sum(0).to(torch.int64)
            coact[li] += (chosen.T @ chosen).round().to(torch.int64)
        return record

    handles = [m.router.register_forward_hook(hook(li)) for li, (_, m) in enumerate(layers)]
    try:
        for start in range(0, tokens.shape[0], batch_size):
            batch = torch.from_numpy(tokens[start:start + batch_size]).to(device)
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return {"layers": [i for i, _ in layers], "tokens": int(tokens.size), "top_k": top_k,
            "num_experts": num_experts, "counts": counts.numpy(), "coact": coact.numpy()}


def summarize(domains: dict[str, dict]) -> dict:
    """The JSON summary from per-domain collect_routing() results (same model)."""
    first = next(iter(domains.values()))
    E, k, layer_ids = first["num_experts"], first["top_k"], first["layers"]
    counts = sum(d["counts"] for d in domains.values())
    coact = sum(d["coact"] for d in domains.values())
    tokens = sum(d["tokens"] for d in domains.values())
    layers = []
    for li, layer in enumerate(layer_ids):
        c = counts[li].astype(np.float64)
        share = c / max(1.0, c.sum())
        diag = np.diag(coact[li]).astype(np.float64)
        cond = coact[li] / np.maximum(diag[:, None], 1)       # P(j | i) for the same token
        np.fill_diagonal(cond, 0.0)
        layers.append({
            "layer": layer, "tokens_per_expert": counts[li].tolist(), "load_share": share.round(6).tolist(),
            "max_load_over_uniform": float(share.max() * E), "min_load_over_uniform": float(share.min() * E),
            "load_cv": float(share.std() / share.mean()) if share.mean() > 0 else 0.0,
            "coactivation_counts": coact[li].tolist(), "coactivation_conditional": cond.round(6).tolist(),
        })
    domain_out = {}
    for name, d in domains.items():
        share = d["counts"] / max(1, d["tokens"])              # [L, E]: sums to k per layer
        domain_out[name] = {"tokens": d["tokens"], "expert_share": share.round(6).tolist(),
                            "max_share_over_uniform": (share.max(1) / (k / E)).round(4).tolist()}
    return {"num_experts": E, "top_k": k, "tokens": tokens, "moe_layers": layer_ids,
            "uniform_share": k / E, "layers": layers, "domains": domain_out}


# --------------------------------------------------------------------------------------- plots

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ValueError("analyze-routing needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt
    return plt


def pick_layers(layer_ids: list[int], wanted: list[int] | None, max_layers: int = 4) -> list[int]:
    """Positions (into layer_ids) of the layers to draw: `wanted`, else first / middle / last."""
    if wanted:
        missing = [w for w in wanted if w not in layer_ids]
        if missing:
            raise ValueError(f"--layers {missing[0]} is not a MoE layer; MoE layers are {layer_ids}")
        return [layer_ids.index(w) for w in wanted]
    n = len(layer_ids)
    count = min(n, max_layers)
    return sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(count)})


def plot_expert_load(summary: dict, path: str) -> None:
    plt = _pyplot()
    E = summary["num_experts"]
    grid = np.array([l["load_share"] for l in summary["layers"]]) * E   # 1 = uniform
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * E + 3), max(2.5, 0.4 * len(grid) + 1.5)))
    from matplotlib.colors import TwoSlopeNorm
    # White at 1 (balanced), red = overloaded, blue = underused.
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(grid.max())))
    im = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=norm)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(grid)), [str(l) for l in summary["moe_layers"]])
    if E <= 32:
        ax.set_xticks(range(E))
    if grid.size <= 256:
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="load / uniform load (1 = balanced)")
    ax.set_title(f"Expert load per layer ({summary['tokens']} tokens, top-{summary['top_k']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_coactivation(summary: dict, layer_pos: list[int], path: str) -> None:
    plt = _pyplot()
    n = len(layer_pos)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1.4, 3.8), squeeze=False, layout="constrained")
    im = None
    for ax, li in zip(axes[0], layer_pos):
        layer = summary["layers"][li]
        cond = np.array(layer["coactivation_conditional"], dtype=float)
        np.fill_diagonal(cond, np.nan)          # P(i | i) = 1 says nothing
        im = ax.imshow(cond, cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer['layer']}")
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i")
    fig.colorbar(im, ax=list(axes[0]), label="P(j also chosen | i chosen)", shrink=0.9)
    fig.suptitle(f"Expert co-activation ({summary['tokens']} tokens, top-{summary['top_k']})")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_domain_specialization(summary: dict, layer_pos: list[int], path: str) -> None:
    plt = _pyplot()
    names = list(summary["domains"])
    E, uniform = summary["num_experts"], summary["uniform_share"]
    fig, axes = plt.subplots(len(layer_pos), 1, figsize=(max(6, 0.3 * E * max(1, len(names)) + 2),
                                                          2.6 * len(layer_pos) + 0.6), squeeze=False)
    width = 0.8 / len(names)
    x = np.arange(E)
    for ax, li in zip(axes[:, 0], layer_pos):
        for di, name in enumerate(names):
            share = summary["domains"][name]["expert_share"][li]
            ax.bar(x + (di - (len(names) - 1) / 2) * width, share, width, label=name)
        ax.axhline(uniform, color="black", linestyle="--", linewidth=1, label=f"uniform (k/E = {uniform:.3f})")
        ax.set_ylabel("share of tokens")
        ax.set_title(f"layer {summary['layers'][li]['layer']}")
        if E <= 32:
            ax.set_xticks(x)
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].legend(fontsize=8, ncol=min(4, len(names) + 1))
    fig.suptitle("Tokens routed to each expert, per domain")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_metrics(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write
    # A resumed run appends steps it already logged before the crash: keep the last record per step.
    by_step = {int(r["step"]): r for r in rows if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(metrics_path: str, path: str) -> dict:
    plt = _pyplot()
    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path!r} has no step records")
    steps = [r["step"] for r in rows]
    has_aux = any(r.get("lb_loss") is not None for r in rows)
    fig, axes = plt.subplots(2 if has_aux else 1, 1, figsize=(7, 6 if has_aux else 3.5), squeeze=False,
                             sharex=True)
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in rows], label="loss (ce + aux)", linewidth=1)
    if any("ce" in r for r in rows):
        ax.plot(steps, [r.get("ce", np.nan) for r in rows], label="cross-entropy", linewidth=1)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=4)
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_aux:
        ax2 = axes[1, 0]
        ax2.plot(steps, [r.get("lb_loss", np.nan) for r in rows], label="load-balancing loss")
        ax2.plot(steps, [r.get("z_loss", np.nan) for r in rows], label="router z-loss")
        ax2.set_ylabel("aux loss (unweighted)")
        ax2.legend()
        ax2.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))) or "training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"metrics": metrics_path, "steps": len(rows), "first_loss": rows[0]["loss"],
            "last_loss": rows[-1]["loss"], "last_val_loss": val[-1][1] if val else None}


def find_metrics(ckpt_dir: str) -> str | None:
    """<out_dir>/metrics.jsonl next to <out_dir>/checkpoints/<step>/."""
    candidate = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt_dir))), "metrics.jsonl")
    return candidate if os.path.exists(candidate) else None


# ----------------------------------------------------------------------------------------- main

def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="megamoe analyze-routing",
                                description="Expert load / co-activation / domain plots of a MoE checkpoint")
    p.add_argument("checkpoint", help="checkpoint dir (model.pt + config.yaml) or a run dir (newest checkpoint)")
    p.add_argument("--data", nargs="+", default=[], metavar="PREFIX",
                   help="indexed datasets (.bin/.idx prefixes), one domain each")
    p.add_argument("--tokens-npy", nargs="+", default=[], metavar="FILE",
                   help=".npy token arrays (1-D stream or 2-D rows), one domain each")
    p.add_argument("--domain-names", default="", help="comma-separated names (default: file names)")
    p.add_argument("--num-tokens", type=int, default=16384, help="tokens per domain (default 16384)")
    p.add_argument("--seq-length", type=int, default=0, help="default: the model's seq_length")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", default="", help="comma-separated MoE layer ids to draw in detail")
    p.add_argument("--metrics", default="", help="metrics.jsonl for the loss curve (default: the run's)")
    p.add_argument("--out", default="routing_analysis", help="output directory (default routing_analysis)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def analyze(args) -> dict:
    if not args.data and not args.tokens_npy:
        raise ValueError("give at least one dataset: --data PREFIX or --tokens-npy FILE")
    if args.num_tokens < 1 or args.batch_size < 1:
        raise ValueError("--num-tokens and --batch-size must be >= 1")
    model, cfg, ckpt_dir, step = load_checkpoint_model(args.checkpoint, args.device)
    seq = args.seq_length or cfg.model.seq_length
    if seq > cfg.model.seq_length:
        raise ValueError(f"--seq-length {seq} exceeds the model's seq_length {cfg.model.seq_length}")
    sources = [("data", s) for s in args.data] + [("npy", s) for s in args.tokens_npy]
    names = [n.strip() for n in args.domain_names.split(",") if n.strip()] if args.domain_names else []
    if names and len(names) != len(sources):
        raise ValueError(f"--domain-names has {len(names)} names for {len(sources)} datasets")
    names = names or [os.path.splitext(os.path.basename(s))[0] for _, s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must differ ({', '.join(names)}); set --domain-names")

    domains = {}
    for name, (kind, src) in zip(names, sources):
        tokens = (tokens_from_indexed(src, args.num_tokens, seq) if kind == "data"
                  else tokens_from_npy(src, args.num_tokens, seq))
        if tokens.max() >= cfg.model.vocab_size or tokens.min() < 0:
            raise ValueError(f"{src!r} has token ids outside [0, {cfg.model.vocab_size}) (the model's vocabulary)")
        domains[name] = collect_routing(model, tokens, args.batch_size, args.device)

    os.makedirs(args.out, exist_ok=True)
    summary = {"checkpoint": os.path.abspath(ckpt_dir), "step": step, **summarize(domains)}
    wanted = [int(x) for x in args.layers.split(",") if x.strip()] if args.layers else None
    layer_pos = pick_layers(summary["moe_layers"], wanted)
    files = {}
    files["expert_load"] = os.path.join(args.out, "expert_load.png")
    plot_expert_load(summary, files["expert_load"])
    files["coactivation"] = os.path.join(args.out, "coactivation.png")
    plot_coactivation(summary, layer_pos, files["coactivation"])
    files["domain_specialization"] = os.path.join(args.out, "domain_specialization.png")
    plot_domain_specialization(summary, layer_pos, files["domain_specialization"])
    metrics = args.metrics or find_metrics(ckpt_dir)
    if args.metrics and not os.path.exists(args.metrics):
        raise ValueError(f"metrics file {args.metrics!r} not found")
    if metrics:
        files["loss_curve"] = os.path.join(args.out, "loss_curve.png")
        summary["training"] = plot_loss_curve(metrics, files["loss_curve"])
    files["summary"] = os.path.join(args.out, "routing_summary.json")
    summary["files"] = files
    with open(files["summary"], "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def main(argv: list[str]) -> int:
    summary = analyze(parse_args(argv))
    print(f"analyze-routing: {summary['tokens']} tokens over {len(summary['domains'])} domain(s), "
          f"{len(summary['moe_layers'])} MoE layers x {summary['num_experts']} experts; wrote "
          + ", ".join(os.path.basename(p) for p in summary["files"].values())
          + f" to {os.path.dirname(summary['files']['summary']) or '.'}")
    for layer in summary["layers"]:
        print(f"  layer {layer['layer']:>3}: busiest expert {layer['max_load_over_uniform']:.2f}x uniform, "
              f"idlest {layer['min_load_over_uniform']:.2f}x, load cv {layer['load_cv']:.3f}")
    return 0
