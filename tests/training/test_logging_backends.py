"""Training metrics: the per-step jsonl record (throughput, TFLOP/s, MFU, MoE losses, expert load,
validation loss), the Megatron FLOP formula, the console line, and the optional sinks
(TensorBoard event files when tensorboard is importable, W&B only when installed)."""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np
import pytest
import torch

from megamoe.config import preset
from megamoe.model.transformer import build_model, flops_per_token
from megamoe.training import logging_backends as lb
from megamoe.training.metrics import PEAK_ENV, device_peak_flops, format_console
from megamoe.training.trainer import Trainer
from megamoe.training.build import build_training

STEPS, VOCAB, SEQ = 4, 256, 16
PEAK_TFLOPS = 0.5      # a pretend device: MFU = achieved TFLOP/s / 0.5


def small_cfg(out_dir):
    cfg = preset("tiny")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.seq_length, m.ffn_hidden = VOCAB, 32, 2, 2, SEQ, 64
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden = 4, 2, 32
    cfg.steps, cfg.micro_batch_size, cfg.global_batch_size = STEPS, 2, 4
    cfg.eval_interval, cfg.eval_iters, cfg.save_interval, cfg.log_interval = 2, 1, 0, 1
    cfg.optim.warmup_steps = 1
    cfg.out_dir, cfg.progress = out_dir, False
    return cfg


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is fastest, and immune to other busy processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=SEQ + 1) for _ in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short training run on a device with a known (pretend) peak; its records and out_dir."""
    out_dir = str(tmp_path_factory.mktemp("metrics_run"))
    cfg = small_cfg(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # tiny matrices: one thread is fastest, and immune to busy cores
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(PEAK_ENV, str(PEAK_TFLOPS))
            trainer = Trainer(build_training(cfg, build_model(cfg.model, seed=0), device=torch.device("cpu"), verbose=False), synthetic(32, 0), synthetic(8, 1))
            history = trainer.train()
    finally:
        torch.set_num_threads(threads)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return cfg, history, rows


def test_jsonl_has_a_record_per_step_with_all_metrics(run):
    cfg, history, rows = run
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in ("time", "loss", "ce", "lr", "grad_norm", "step_time_s", "tokens_per_s", "tflops_per_device",
                    "mfu", "lb_loss", "z_loss", "expert_load", "expert_load_cv", "host_rss_gib"):
            assert key in r, key
        assert r["tokens_per_s"] > 0 and r["tflops_per_device"] > 0 and 0 < r["mfu"]
        assert r["lb_loss"] > 0 and r["z_loss"] > 0 and math.isfinite(r["loss"])
        assert r["host_rss_gib"] > 0
        # Tokens per expert, per MoE layer, as shares of the layer's token-slots.
        assert len(r["expert_load"]) == cfg.model.num_layers
        for shares in r["expert_load"]:
            assert len(shares) == cfg.model.moe.num_experts
            assert abs(sum(shares) - 1) < 1e-3 and min(shares) >= 0
    # In-loop validation every eval_interval steps (and at the end).
    assert [r["step"] for r in rows if r.get("val_loss") is not None] == [2, 4]
    assert all(math.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    # The jsonl holds what train() returned.
    assert [r["loss"] for r in rows] == [h["loss"] for h in history]


def test_throughput_tflops_and_mfu_arithmetic(run):
    cfg, _, rows = run
    tokens = cfg.global_batch_size * cfg.model.seq_length
    fpt = flops_per_token(cfg.model)
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(tokens / r["step_time_s"], rel=1e-9)
        assert r["tflops_per_device"] == pytest.approx(tokens * fpt / r["step_time_s"] / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] / PEAK_TFLOPS, rel=1e-9)


def test_megatron_flop_formula_by_hand():
    """Megatron-LM's num_floating_point_operations per token (fwd + bwd = 3 x fwd, 2 FLOPs per
    multiply-add, causal attention counted half, SwiGLU = 3 matrices, routed experts x top_k),
    for a 3-layer model: 1 dense layer, 2 MoE layers with a shared expert, GQA."""
    cfg = preset("tiny").model
    cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim = 64, 3, 4, 2, 16
    cfg.seq_length, cfg.vocab_size, cfg.ffn_hidden = 32, 256, 128
    moe = cfg.moe
    moe.num_experts, moe.top_k, moe.expert_hidden = 4, 2, 32
    moe.num_shared_experts, moe.shared_expert_hidden, moe.first_k_dense = 1, 48, 1
    H, S, V, q, kv = 64, 32, 256, 4 * 16, 2 * 16
    attn_linear = 6 * (H * (q + 2 * kv) + q * H)      # 73728: q, k, v and output projections
    attn_core = 6 * (q * S / 2 * 2)                    # 12288: QK^T and PV, causal half
    dense_mlp = 6 * H * 128 * 3                        # 147456
    routed_and_shared = 6 * H * (32 * 2 * 3 + 48 * 3)  # 129024
    logits = 6 * H * V                                 # 98304
    megatron = 3 * (attn_linear + attn_core) + dense_mlp + 2 * routed_and_shared + logits
    assert megatron == 764928 - 2 * 1536
    # megamoe also counts the router GEMM (H x E per MoE layer), which Megatron leaves out.
    router = 6 * H * 4                                 # 1536
    assert flops_per_token(cfg) == megatron + 2 * router == 764928
    # At scale the router term is negligible: OLMoE-1B-7B, < 0.3 % of the total.
    olmoe = preset("olmoe-1b-7b").model
    router_share = olmoe.num_layers * 6 * olmoe.d_model * olmoe.moe.num_experts / flops_per_token(olmoe)
    assert router_share < 0.003


def test_peak_flops_of_known_devices(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    cuda = torch.device("cuda", 0)
    for name, peak in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA B200", 2250e12),
                       ("NVIDIA GB200", 2500e12), ("Some Future GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert device_peak_flops(cuda) == peak, name
    assert device_peak_flops(torch.device("cpu")) is None        # MFU is not reported on CPU...
    assert device_peak_flops(torch.device("cpu"), {PEAK_ENV: "2.5"}) == 2.5e12   # ...unless told
    with pytest.raises(ValueError, match=PEAK_ENV):
        device_peak_flops(torch.device("cpu"), {PEAK_ENV: "fast"})


def test_console_line(run):
    _, _, rows = run
    line = format_console(rows[-1])
    for part in ("step 4", "loss ", "tok/s", "TFLOP/s/device", "mfu ", "lb ", " z ", "load-cv", "val loss"):
        assert part in line, (part, line)
    assert "\n" not in line


def test_flatten_record_tags():
    rec = {"step": 3, "loss": 2.5, "val_loss": None, "mfu": float("nan"), "skipped": False,
           "tokens_per_s": 100.0, "lb_loss": 1.0, "expert_load": [[0.5, 0.25, 0.25, 0.0], [0.25] * 4]}
    flat = lb.flatten_record(rec)
    assert flat == {"train/loss": 2.5, "perf/tokens_per_s": 100.0, "moe/lb_loss": 1.0,
                    "moe/layer0/max_load": 2.0, "moe/layer0/min_load": 0.0,
                    "moe/layer1/max_load": 1.0, "moe/layer1/min_load": 1.0}


def test_broken_sink_is_dropped_not_fatal(capsys):
    class Broken:
        def log(self, rec):
            raise OSError("disk full")

        def close(self):
            pass

    class Good:
        logged = []

        def log(self, rec):
            self.logged.append(rec["step"])

        def close(self):
            pass

    good = Good()
    sinks = lb.MetricSinks([Broken(), good])
    sinks.log({"step": 1, "loss": 1.0})
    sinks.log({"step": 2, "loss": 1.0})
    sinks.close()
    assert good.logged == [1, 2]
    assert "disabling Broken after an error: disk full" in capsys.readouterr().err


def test_sinks_off_on_other_ranks_and_without_packages(tmp_path, monkeypatch, capsys):
    cfg = small_cfg(str(tmp_path))
    cfg.wandb_project = "megamoe-test"
    assert lb.build_sinks(cfg, enabled=False).sinks == []
    monkeypatch.setattr(lb, "tensorboard_available", lambda: False)
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    assert lb.build_sinks(cfg).sinks == []
    assert "wandb is not installed" in capsys.readouterr().err


@pytest.mark.skipif(not lb.tensorboard_available(), reason="tensorboard is not installed")
def test_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = small_cfg(str(tmp_path))
    cfg.tensorboard = True
    Trainer(build_training(cfg, build_model(cfg.model, seed=0), device=torch.device("cpu"), verbose=False), synthetic(32, 0), synthetic(8, 1)).train()
    events = glob.glob(os.path.join(str(tmp_path), "tensorboard", "events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "val/loss", "perf/tokens_per_s", "perf/tflops_per_device", "moe/lb_loss",
                "moe/z_loss", "moe/layer0/max_load", "moe/layer1/max_load"):
        assert tag in tags, (tag, sorted(tags))
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    assert [e.step for e in acc.Scalars("val/loss")] == [2, 4]


def test_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = small_cfg(str(tmp_path))
    cfg.wandb_project, cfg.tensorboard, cfg.steps = "megamoe-test", False, 2
    Trainer(build_training(cfg, build_model(cfg.model, seed=0), device=torch.device("cpu"), verbose=False), synthetic(32, 0), synthetic(8, 1)).train()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert run_id and glob.glob(os.path.join(str(tmp_path), "wandb", f"*{run_id}*"))
    del wandb


@pytest.mark.skipif(not lb.tensorboard_available(), reason="tensorboard is not installed")
def test_tensorboard_after_resume_has_each_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = small_cfg(str(tmp_path))
    cfg.tensorboard, cfg.steps, cfg.save_interval, cfg.eval_interval = True, 6, 2, 0

    class Crash(Exception):
        pass

    def crash_after_step_5():
        if trainer.step == 5:     # logged up to 5, newest checkpoint at 4
            raise Crash
        return False

    trainer = Trainer(build_training(cfg, build_model(cfg.model, seed=0), device=torch.device("cpu"), verbose=False), synthetic(32, 0))
    with pytest.raises(Crash):
        trainer.train(stop_requested=crash_after_step_5)
    Trainer(build_training(cfg, build_model(cfg.model, seed=0), device=torch.device("cpu"), verbose=False), synthetic(32, 0)).train()   # resumes at 4
    acc = EventAccumulator(os.path.join(str(tmp_path), "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_wandb_sink_with_a_stand_in_module(tmp_path, monkeypatch):
    """The W&B calls, without wandb: one run id kept in out_dir (a requeued job continues the same
    run), resume="allow", flattened scalars at the record's step, finish() on close."""
    import sys
    import types
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(
        util=types.SimpleNamespace(generate_id=lambda: f"id{len(calls)}"),
        init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(lb, "tensorboard_available", lambda: False)
    cfg = small_cfg(str(tmp_path / "run"))
    cfg.wandb_project = "proj"
    for step in (1, 2):                      # two "jobs" on the same out_dir
        sinks = lb.build_sinks(cfg)
        assert [type(s).__name__ for s in sinks.sinks] == ["WandbSink"]
        sinks.log({"step": step, "loss": 3.0, "expert_load": [[0.5, 0.5]]})
        sinks.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] == "id0"
    assert inits[0]["project"] == "proj" and inits[0]["resume"] == "allow" and inits[0]["name"] == "run"
    assert ("log", 2, {"train/loss": 3.0, "moe/layer0/max_load": 1.0, "moe/layer0/min_load": 1.0}) in calls
    assert calls.count(("finish",)) == 2
