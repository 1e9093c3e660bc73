#!/usr/bin/env python
"""One full training step (fwd + bwd + grad clip + AdamW) of an OLMoE-architecture model:
megamoe vs transformers' OlmoeForCausalLM, same weights, same data, in one run.

    python benchmarks/train_step.py                  # GPU: OLMoE-1B-7B dims, 2 layers, seq 4096, batch 2
    python benchmarks/train_step.py --layers 4 --batch 1
    python benchmarks/train_step.py --tiny           # CPU-sized model (< 1 min), fp32
    python benchmarks/train_step.py --tiny --check   # also check both compute the same logits first

Models: megamoe's preset "olmoe-1b-7b" model config with --layers layers (and --seq); the
transformers config comes from megamoe's own mapping (megamoe.hf.layouts.config_to_hf, model
type "olmoe") and the weights from megamoe.hf.convert.to_hf_state (per-expert tensors, fused
here into transformers 5.x's in-memory experts.gate_up_proj / down_proj), so both models start
from identical parameters and route identically. transformers runs with attn_implementation
sdpa, experts_implementation grouped_mm (--hf-experts to change), use_cache off,
output_router_logits on (its load-balancing loss, like megamoe's aux losses, is in the step).

Variants:
  megamoe     megamoe.training.trainer.Trainer.train_step(): bf16 autocast on GPU (fp32 master
              weights), fp32 on CPU; torch AdamW (optim.impl=torch), clip 1.0
  hf[amp]     OlmoeForCausalLM, fp32 parameters under bf16 autocast (what the HF Trainer's
              bf16=True does); GPU only. Note: transformers' grouped_mm experts are not
              autocast-aware, so its expert GEMMs then run in fp32.
  hf[bf16]    OlmoeForCausalLM with bf16 parameters (AdamW on bf16 weights); GPU only
  hf[fp32]    OlmoeForCausalLM in fp32; CPU
  hf step = logits -> fp32 cross-entropy (same function as megamoe) + router_aux_loss_coef x
  aux_loss -> backward -> clip_grad_norm_(1.0) -> torch.optim.AdamW (same param groups, lr,
  betas, eps, weight decay as megamoe; fused on GPU).

Timing: torch.cuda.synchronize() around every step (GPU) / perf_counter (CPU); median over
--steps after --warmup. On GPU each variant runs alone (peak memory = torch.cuda.max_memory_allocated
of its steps, model + optimizer state included); on CPU the variants alternate step by step so
that load from other processes hits them alike (peak memory n/a).
Throughput: tokens/s = batch x seq / step time; TFLOP/s = tokens/s x
megamoe.model.transformer.flops_per_token (Megatron formula, top-k experts, causal attention);
MFU = TFLOP/s / megamoe.training.metrics.device_peak_flops (dense bf16 peak; n/a on CPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from megamoe import ops  # noqa: E402
from megamoe.config import preset  # noqa: E402
from megamoe.data.sampler import rank_micro_batches  # noqa: E402
from megamoe.hf.convert import to_hf_state  # noqa: E402
from megamoe.hf.layouts import config_to_hf, expert_keys, fused_expert_keys, get_layout  # noqa: E402
from megamoe.model.transformer import build_model, flops_per_token  # noqa: E402
from megamoe.training.metrics import device_peak_flops  # noqa: E402
from megamoe.training.optim import param_groups  # noqa: E402
from megamoe.training.build import build_training  # noqa: E402
from megamoe.training.context import cross_entropy  # noqa: E402
from megamoe.training.trainer import Trainer  # noqa: E402


# ------------------------------------------------------------------------------------ configs

def train_config(tiny: bool, layers: int, seq: int, batch: int, out_dir: str):
    cfg = preset("olmoe-1b-7b")
    m = cfg.model
    if tiny:   # same architecture (QK-norm, softmax-top-k router, untied head), CPU-sized
        m.vocab_size, m.d_model, m.num_heads, m.ffn_hidden = 4096, 256, 4, 1024
        m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden = 8, 2, 256
    m.num_layers, m.seq_length = layers, seq
    cfg.micro_batch_size = cfg.global_batch_size = batch
    cfg.steps = 10_000                      # only sets the LR schedule's length
    cfg.optim.warmup_steps = 1
    cfg.optim.impl = "torch"                # torch AdamW on both sides
    cfg.out_dir, cfg.resume, cfg.progress = out_dir, False, False
    cfg.tensorboard, cfg.watchdog_s, cfg.eval_interval = False, 0, 0
    return cfg


def hf_config(model_cfg, experts_impl: str):
    from transformers import OlmoeConfig

    fields = config_to_hf(model_cfg, "olmoe")
    fields.update(use_cache=False, output_router_logits=True, pad_token_id=None, bos_token_id=None,
                  eos_token_id=None)   # no padding_idx row in the embedding (megamoe has none)
    hc = OlmoeConfig.from_dict(fields)
    hc._attn_implementation = "sdpa"
    hc._experts_implementation = experts_impl
    return hc


def hf_state_from_megamoe(model_cfg, state: dict) -> dict:
    """megamoe state -> transformers 5.x in-memory state (fused experts)."""
    layout = get_layout("olmoe")
    hf = to_hf_state(model_cfg, state, "olmoe")          # per-expert tensors, as on disk
    for layer in range(model_cfg.num_layers):
        gates, ups, downs = [], [], []
        for e in range(model_cfg.moe.num_experts):
            g, u, d = expert_keys(layout, layer, e)
            gates.append(hf.pop(g))
            ups.append(hf.pop(u))
            downs.append(hf.pop(d))
        gate_up_key, down_key = fused_expert_keys(layout, layer)
        hf[gate_up_key] = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)   # [E, 2I, H]
        hf[down_key] = torch.stack(downs)                                             # [E, H, I]
    return hf


def build_hf(model_cfg, hf_state: dict, experts_impl: str, dtype: torch.dtype, device):
    from transformers import OlmoeForCausalLM

    model = OlmoeForCausalLM(hf_config(model_cfg, experts_impl))
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weight transfer to transformers failed: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model.to(device=device, dtype=dtype).train()


# ----------------------------------------------------------------------------------- variants

class MegamoeVariant:
    name = "megamoe"

    def __init__(self, cfg, state: dict, dataset, device):
        self.cfg, self.state, self.dataset, self.device = cfg, state, dataset, device
        self.trainer = None

    def setup(self):
        model = build_model(self.cfg.model)
        model.load_state_dict(self.state)
        self.trainer = Trainer(build_training(self.cfg, model, device=self.device, verbose=False), self.dataset)

    def step(self, i: int):
        self.trainer.step = i
        return self.trainer.train_step()["loss"]

    def teardown(self):
        self.trainer = None


class HFVariant:
    def __init__(self, name, cfg, hf_state: dict, dataset, device, dtype, amp: bool, experts_impl: str):
        self.name, self.cfg, self.hf_state, self.dataset = name, cfg, hf_state, dataset
        self.device, self.dtype, self.amp, self.experts_impl = device, dtype, amp, experts_impl
        self.model = self.opt = None

    def setup(self):
        o = self.cfg.optim
        self.model = build_hf(self.cfg.model, self.hf_state, self.experts_impl, self.dtype, self.device)
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr,
                                     betas=(o.beta1, o.beta2), eps=o.eps,
                                     fused=True if self.device.type == "cuda" else None)

    def step(self, i: int):
        cfg = self.cfg
        ids = rank_micro_batches(i, cfg.global_batch_size, cfg.micro_batch_size, 0, 1)[0]
        inputs, labels = batch_of(self.dataset, ids, self.device)
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.model(input_ids=inputs)
        loss = cross_entropy(out.logits, labels) + self.model.router_aux_loss_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
        for group in self.opt.param_groups:
            group["lr"] = cfg.optim.lr
        self.opt.step()
        return float(loss.detach())

    def teardown(self):
        self.model = self.opt = None


def batch_of(dataset, ids, device):
    data = torch.from_numpy(np.stack([dataset[i % len(dataset)] for i in ids])).to(device)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


# --------------------------------------------------------------------------------------- check

@torch.no_grad()
def check_same_model(cfg, state, hf_state, dataset, device) -> float:
    """max |logits_megamoe - logits_hf| / max |logits| in fp32 on the first batch."""
    mm = build_model(cfg.model)
    mm.load_state_dict(state)
    mm = mm.to(device).eval()
    hf = build_hf(cfg.model, hf_state, "grouped_mm", torch.float32, device).eval()
    inputs, _ = batch_of(dataset, list(range(cfg.micro_batch_size)), device)
    a, b = mm(inputs).float(), hf(input_ids=inputs).logits.float()
    return ((a - b).abs().max() / a.abs().max()).item()


# ---------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU-sized OLMoE-architecture model")
    ap.add_argument("--layers", type=int, default=None, help="default 2")
    ap.add_argument("--seq", type=int, default=None, help="default 4096 (256 with --tiny)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5 GPU, 2 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 GPU, 1 CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hf-experts", default="grouped_mm", help="transformers experts implementation")
    ap.add_argument("--check", action="store_true", help="first check both models' fp32 logits agree")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    layers = args.layers or 2
    seq = args.seq or (256 if args.tiny else 4096)
    batch = args.batch or 2
    steps = args.steps or (5 if on_gpu else 2)
    warmup = args.warmup if args.warmup is not None else (2 if on_gpu else 1)

    tmp = tempfile.TemporaryDirectory()
    cfg = train_config(args.tiny, layers, seq, batch, tmp.name)
    cfg.dtype = "auto"                       # megamoe: bf16 autocast on GPU, fp32 on CPU
    m = cfg.model
    tokens = batch * seq
    fpt = flops_per_token(m)
    peak = device_peak_flops(device)
    dev_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"OLMoE-architecture train step: d {m.d_model}, {m.num_layers} layers, {m.num_heads} heads, "
          f"{m.moe.num_experts} experts top-{m.moe.top_k} (hidden {m.moe.expert_hidden}), vocab {m.vocab_size}, "
          f"seq {seq}, batch {batch} ({tokens} tokens/step); {dev_name}; "
          f"{fpt / 1e9:.3f} GFLOP/token (Megatron formula); median of {steps} after {warmup} warmup; "
          f"megamoe permute ops: {ops.backend(device)}")

    model = build_model(m, seed=cfg.seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params, n_active = model.num_params(), model.num_params(active=True)
    del model
    hf_state = hf_state_from_megamoe(m, state)
    print(f"params {n_params / 1e9:.3f} B total, {n_active / 1e9:.3f} B active")
    rng = np.random.default_rng(0)
    dataset = [rng.integers(0, m.vocab_size, seq + 1, dtype=np.int64) for _ in range(4 * batch)]

    if args.check:
        err = check_same_model(cfg, state, hf_state, dataset, device)
        if on_gpu:
            torch.cuda.empty_cache()
        print(f"check: fp32 logits megamoe vs transformers, max |diff| / max |logit| = {err:.1e} -> "
              f"{'OK' if err < (1e-4 if not on_gpu else 5e-3) else 'MISMATCH'}")

    variants = [MegamoeVariant(copy.deepcopy(cfg), state, dataset, device)]
    if on_gpu:
        variants.append(HFVariant("hf[amp]", cfg, hf_state, dataset, device, torch.float32, True, args.hf_experts))
        variants.append(HFVariant("hf[bf16]", cfg, hf_state, dataset, device, torch.bfloat16, False, args.hf_experts))
    else:
        variants.append(HFVariant("hf[fp32]", cfg, hf_state, dataset, device, torch.float32, False, args.hf_experts))

    def timed(v, i):
        if on_gpu:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = v.step(i)
        if on_gpu:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, loss

    times = {v.name: [] for v in variants}
    losses = {v.name: [] for v in variants}
    mem = {v.name: None for v in variants}
    if on_gpu:        # one variant at a time: absolute peak memory per variant
        for v in variants:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            v.setup()
            for i in range(warmup + steps):
                dt, loss = timed(v, i)
                losses[v.name].append(loss)
                if i >= warmup:
                    times[v.name].append(dt)
            mem[v.name] = torch.cuda.max_memory_allocated(device) / 2**30
            v.teardown()
    else:             # alternate step by step: noise from other processes hits every variant
        for v in variants:
            v.setup()
        for i in range(warmup + steps):
            for v in variants:
                dt, loss = timed(v, i)
                losses[v.name].append(loss)
                if i >= warmup:
                    times[v.name].append(dt)

    print(f"{'variant':10s} {'step ms':>10s} {'tokens/s':>11s} {'TFLOP/s':>9s} {'MFU':>7s} "
          f"{'peak GiB':>9s}  losses")
    tps = {}
    for v in variants:
        dt = statistics.median(times[v.name])
        tps[v.name] = tokens / dt
        tflops = tps[v.name] * fpt / 1e12
        mfu = f"{100 * tflops * 1e12 / peak:6.1f}%" if peak else f"{'n/a':>7s}"
        mem_s = f"{mem[v.name]:9.2f}" if mem[v.name] is not None else f"{'n/a':>9s}"
        print(f"{v.name:10s} {dt * 1e3:10.1f} {tps[v.name]:11.0f} {tflops:9.3f} {mfu} {mem_s}  "
              + " ".join(f"{x:.4f}" for x in losses[v.name]))
    for v in variants[1:]:
        print(f"ratio megamoe / {v.name} (tokens/s): {tps['megamoe'] / tps[v.name]:.3f}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
