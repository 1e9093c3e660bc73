"""Routing analysis (megamoe/analysis/routing.py, tools/analyze_routing.py).

- exact load / co-activation / per-domain numbers on a hand-built router whose choices are known;
- a checkpoint trained for 3 steps: PNGs written and readable, the numbers consistent with the
  MoE layers' own token counts, the loss curve read from the run's metrics.jsonl;
- the CLI: --help, and one-line errors with a non-zero exit for a missing checkpoint etc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from megamoe.analysis import routing
from megamoe.cli import main as cli_main
from megamoe.config import MoEConfig, preset
from megamoe.model.transformer import build_model
from megamoe.moe.layer import MoELayer
from megamoe import checkpoint as ckpt
from megamoe.training.trainer import Trainer
from megamoe.training.build import build_training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one intra-op thread is fastest, and immune to other busy processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ hand-checkable routing

# Token t (one-hot input) -> the two experts each layer's router must pick.
CHOICES = [
    {0: (0, 1), 1: (0, 2), 2: (1, 3), 3: (2, 3)},   # layer 0
    {0: (0, 1), 1: (1, 2), 2: (2, 3), 3: (3, 0)},   # layer 1
]


class OneHotRouted(nn.Module):
    """Tokens 0..3 as one-hot vectors into two MoE layers (4 experts, top-2) whose router weights
    make token t pick exactly CHOICES[layer][t]. Both layers see the one-hot input."""

    def __init__(self):
        super().__init__()
        cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, gemm_backend="loop")
        self.layers = nn.ModuleList([MoELayer(4, cfg) for _ in CHOICES])
        with torch.no_grad():
            for layer, choice in zip(self.layers, CHOICES):
                w = torch.zeros(4, 4)                    # [E, H]: logit[e] = w[e, token]
                for token, experts in choice.items():
                    w[list(experts), token] = 5.0
                layer.router.weight.copy_(w)

    def forward(self, tokens):
        x = F.one_hot(tokens, 4).float()
        for layer in self.layers:
            layer(x)
        return x


def test_counts_and_coactivation_by_hand():
    model = OneHotRouted().eval()
    # Domain "mixed": tokens 0,0,0,1 | 1,2,3,3 -> t0 x3, t1 x2, t2 x1, t3 x2. Domain "threes": t3 x8.
    mixed = np.array([[0, 0, 0, 1], [1, 2, 3, 3]])
    threes = np.full((2, 4), 3)
    got = routing.collect_routing(model, mixed, batch_size=1)        # 2 batches, accumulated
    assert got["layers"] == [0, 1] and got["tokens"] == 8 and got["top_k"] == 2 and got["num_experts"] == 4
    # Layer 0: e0 <- t0,t1 = 3+2; e1 <- t0,t2 = 3+1; e2 <- t1,t3 = 2+2; e3 <- t2,t3 = 1+2.
    # Layer 1: e0 <- t0,t3 = 3+2; e1 <- t0,t1 = 3+2; e2 <- t1,t2 = 2+1; e3 <- t2,t3 = 1+2.
    np.testing.assert_array_equal(got["counts"], [[5, 4, 4, 3], [5, 5, 3, 3]])
    coact0 = np.array([[5, 3, 2, 0],     # (0,1) t0 x3, (0,2) t1 x2
                       [3, 4, 0, 1],     # (1,3) t2 x1
                       [2, 0, 4, 2],     # (2,3) t3 x2
                       [0, 1, 2, 3]])
    coact1 = np.array([[5, 3, 0, 2],     # (0,1) t0 x3, (0,3) t3 x2
                       [3, 5, 2, 0],     # (1,2) t1 x2
                       [0, 2, 3, 1],     # (2,3) t2 x1
                       [2, 0, 1, 3]])
    np.testing.assert_array_equal(got["coact"][0], coact0)
    np.testing.assert_array_equal(got["coact"][1], coact1)

    summary = routing.summarize({"mixed": got, "threes": routing.collect_routing(model, threes)})
    assert summary["tokens"] == 16 and summary["uniform_share"] == 0.5 and summary["moe_layers"] == [0, 1]
    layer0 = summary["layers"][0]
    assert layer0["tokens_per_expert"] == [5, 4, 12, 11]              # + 8 x t3 -> e2, e3
    np.testing.assert_allclose(layer0["load_share"], np.array([5, 4, 12, 11]) / 32)
    assert layer0["max_load_over_uniform"] == pytest.approx(12 / 32 * 4)
    assert layer0["min_load_over_uniform"] == pytest.approx(4 / 32 * 4)
    cond = np.array(layer0["coactivation_conditional"])               # P(j | i) = coact / count_i
    assert cond[0, 1] == pytest.approx(3 / 5) and cond[0, 2] == pytest.approx(2 / 5)
    assert cond[2, 3] == pytest.approx(10 / 12) and cond[3, 2] == pytest.approx(10 / 11)
    assert cond[1, 3] == pytest.approx(1 / 4) and cond[0, 3] == 0 and np.all(np.diag(cond) == 0)
    # Per-domain share of tokens routed to each expert (sums to k per layer).
    dom = summary["domains"]
    np.testing.assert_allclose(dom["mixed"]["expert_share"][0], [5 / 8, 4 / 8, 4 / 8, 3 / 8])
    np.testing.assert_allclose(dom["threes"]["expert_share"][0], [0, 0, 1, 1])
    np.testing.assert_allclose(dom["threes"]["expert_share"][1], [1, 0, 0, 1])
    assert dom["mixed"]["max_share_over_uniform"] == [1.25, 1.25]
    assert dom["threes"]["max_share_over_uniform"] == [2.0, 2.0]


def test_pick_layers():
    assert routing.pick_layers([0, 1], None) == [0, 1]
    assert routing.pick_layers(list(range(16)), None) == [0, 5, 10, 15]
    assert routing.pick_layers([1, 3, 5], [5, 1]) == [2, 0]
    with pytest.raises(ValueError, match="--layers 2 is not a MoE layer; MoE layers are"):
        routing.pick_layers([1, 3], [2])


# ------------------------------------------------------------------- trained checkpoint

VOCAB, SEQ = 256, 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """A small MoE trained 3 steps with the Trainer: <run>/checkpoints/step_00000003 + metrics."""
    run = tmp_path_factory.mktemp("routing_run")
    cfg = preset("tiny")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.seq_length, m.ffn_hidden = VOCAB, 32, 3, 2, SEQ, 64
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden, m.moe.first_k_dense = 4, 2, 32, 1  # layer 0 dense
    cfg.steps, cfg.micro_batch_size, cfg.global_batch_size = 3, 4, 4
    cfg.eval_interval, cfg.save_interval, cfg.out_dir, cfg.progress = 0, 0, str(run), False
    cfg.tensorboard = False
    rng = np.random.default_rng(0)
    Trainer(build_training(cfg, build_model(cfg.model, seed=0), device=torch.device("cpu"), verbose=False), [rng.integers(0, VOCAB, SEQ + 1) for _ in range(32)]).train()
    # Two "domains": a 1-D stream of low token ids, and 2-D rows of high ones.
    np.save(run / "low.npy", rng.integers(0, VOCAB // 2, size=20 * SEQ))
    np.save(run / "high.npy", rng.integers(VOCAB // 2, VOCAB, size=(12, SEQ + 3)))
    return run, cfg


def read_png(path):
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 150 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05            # not a blank canvas
    return img


def test_analyze_trained_checkpoint(trained, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run, cfg = trained
    out = tmp_path / "plots"
    # A run directory resolves to its newest checkpoint; names via --domain-names.
    assert cli_main(["analyze-routing", str(run), "--tokens-npy", str(run / "low.npy"), str(run / "high.npy"),
                     "--domain-names", "low,high", "--num-tokens", "256", "--batch-size", "3",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 MoE layers x 4 experts" in printed and "layer   1: busiest expert" in printed
    for name in ("expert_load", "coactivation", "domain_specialization", "loss_curve"):
        read_png(out / f"{name}.png")
    summary = json.loads((out / "routing_summary.json").read_text())
    assert summary["step"] == 3 and summary["checkpoint"].endswith("step_00000003")
    assert summary["moe_layers"] == [1, 2] and summary["num_experts"] == 4 and summary["top_k"] == 2
    tokens = {"low": 256, "high": 12 * SEQ}                 # high: 12 rows of SEQ (cut from SEQ+3)
    assert summary["tokens"] == sum(tokens.values())
    for layer in summary["layers"]:
        counts = np.array(layer["tokens_per_expert"])
        assert counts.sum() == summary["tokens"] * 2
        co = np.array(layer["coactivation_counts"])
        np.testing.assert_array_equal(co, co.T)
        np.testing.assert_array_equal(np.diag(co), counts)
        assert co.sum() - np.trace(co) == summary["tokens"] * 2 * 1   # each token: one pair (k=2), twice
    for name, n in tokens.items():
        assert summary["domains"][name]["tokens"] == n
        np.testing.assert_allclose(np.sum(summary["domains"][name]["expert_share"], axis=1), 2.0, rtol=1e-5)
    assert summary["training"]["steps"] == 3 and summary["training"]["metrics"].endswith("metrics.jsonl")


def test_counts_match_the_moe_layers_own_statistics(trained):
    run, _ = trained
    model, cfg, ckpt_dir, step = routing.load_checkpoint_model(str(run))
    assert step == 3 and not model.training
    tokens = routing.tokens_from_npy(str(run / "low.npy"), 8 * SEQ, SEQ)
    got = routing.collect_routing(model, tokens, batch_size=len(tokens))   # one forward pass
    own = np.stack([m.last_stats["tokens_per_expert"].numpy() for m in model.moe_layers()])
    np.testing.assert_array_equal(got["counts"], own)


def test_indexed_dataset_as_a_domain(trained, tmp_path):
    pytest.importorskip("matplotlib")
    from megamoe.data.indexed import IndexedDatasetBuilder
    run, _ = trained
    rng = np.random.default_rng(3)
    with IndexedDatasetBuilder(str(tmp_path / "wiki_text_document")) as builder:
        for _ in range(10):
            builder.add_document(rng.integers(0, VOCAB, size=int(rng.integers(5, 30))))
    tokens = routing.tokens_from_indexed(str(tmp_path / "wiki_text_document"), 100, SEQ)
    assert tokens.shape == (100 // SEQ, SEQ) and tokens.dtype == np.int64
    assert cli_main(["analyze-routing", str(run / "checkpoints" / "step_00000003"), "--data",
                     str(tmp_path / "wiki_text_document"), "--tokens-npy", str(run / "low.npy"),
                     "--num-tokens", "100", "--out", str(tmp_path / "out"), "--metrics", ""]) == 0
    summary = json.loads((tmp_path / "out" / "routing_summary.json").read_text())
    assert list(summary["domains"]) == ["wiki_text_document", "low"]      # default names: file names
    assert summary["domains"]["wiki_text_document"]["tokens"] == 6 * SEQ


def test_loss_curve_from_metrics_with_a_resumed_run(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "loss": 5.0 - 0.1 * s, "ce": 4.9 - 0.1 * s, "lb_loss": 1.0, "z_loss": 0.5}
            for s in (1, 2, 3, 2, 3, 4)]       # steps 2-3 logged again after a resume
    rows[-1]["val_loss"] = 4.7
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 5, \"lo")  # cut last line
    info = routing.plot_loss_curve(str(path), str(tmp_path / "loss.png"))
    assert info["steps"] == 4 and info["first_loss"] == pytest.approx(4.9)
    assert info["last_loss"] == pytest.approx(4.6) and info["last_val_loss"] == 4.7
    read_png(tmp_path / "loss.png")


# ---------------------------------------------------------------- parallel checkpoints

def _save_parallel_checkpoint(rank, port, out_dir, parallel):
    """Forked worker: a 2-rank run (EP or TP shards) saves its step-0 checkpoint."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    cfg = _parallel_cfg(out_dir, parallel)
    run = build_training(cfg, verbose=False)
    Trainer(run, [np.zeros(SEQ + 1, dtype=np.int64)] * 8).save()
    dist.barrier()
    dist.destroy_process_group()


def _parallel_cfg(out_dir, parallel):
    cfg = preset("tiny")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.seq_length, m.ffn_hidden = VOCAB, 32, 2, 2, SEQ, 64
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden = 4, 2, 32
    cfg.micro_batch_size, cfg.global_batch_size, cfg.out_dir = 2, 4, out_dir
    cfg.parallel.backend = "gloo"
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


@pytest.mark.parametrize("parallel", [{"ep": 2}, {"tp": 2}, {"pp": 2}], ids=["ep2", "tp2", "pp2"])
def test_parallel_checkpoint_is_merged(tmp_path, parallel):
    """model_rank*.pt shards (expert-, tensor- or pipeline-parallel) are put back together: the analysed
    model equals the unsharded model the run started from."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_save_parallel_checkpoint, args=(port, str(tmp_path), parallel), nprocs=2, join=True,
                       start_method="fork")
    ckpt_dir = ckpt.newest_checkpoint(str(tmp_path))
    assert sorted(f for f in os.listdir(ckpt_dir) if f.startswith("model_")) == ["model_rank0.pt",
                                                                              "model_rank1.pt"]
    model, cfg, _, step = routing.load_checkpoint_model(str(tmp_path))
    assert step == 0
    reference = build_model(_parallel_cfg(str(tmp_path), parallel).model, seed=cfg.seed).state_dict()
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------------------- errors

def one_line_error(capsys, argv) -> str:
    assert cli_main(["analyze-routing", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megamoe analyze-routing: error: ") and "\n" not in err, err
    return err


def test_user_errors_are_one_line(trained, tmp_path, capsys):
    run, cfg = trained
    npy = str(run / "low.npy")
    assert "does not exist" in one_line_error(capsys, [str(tmp_path / "nope"), "--tokens-npy", npy])
    assert "neither a megamoe checkpoint" in one_line_error(capsys, [str(tmp_path), "--tokens-npy", npy])
    assert "give at least one dataset" in one_line_error(capsys, [str(run)])
    assert "not found" in one_line_error(capsys, [str(run), "--tokens-npy", str(tmp_path / "x.npy")])
    np.save(tmp_path / "big.npy", np.full(64, VOCAB + 5))
    assert "outside [0, 256)" in one_line_error(capsys, [str(run), "--tokens-npy", str(tmp_path / "big.npy")])
    assert "--layers 0 is not a MoE layer" in one_line_error(
        capsys, [str(run), "--tokens-npy", npy, "--layers", "0", "--out", str(tmp_path / "o")])
    # A dense checkpoint has nothing to route.
    dense = preset("olmo-1b")
    dense.model.vocab_size, dense.model.d_model, dense.model.num_layers, dense.model.num_heads = 64, 16, 1, 2
    dense.model.ffn_hidden, dense.model.seq_length = 32, 8
    from megamoe.config import to_dict
    d = ckpt.save_checkpoint(str(tmp_path / "dense"), 1, {"model.pt": build_model(dense.model).state_dict()},
                             to_dict(dense))
    assert "dense model" in one_line_error(capsys, [d, "--tokens-npy", npy])


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["analyze-routing", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("checkpoint", "--data", "--tokens-npy", "--domain-names", "--num-tokens", "--layers",
                   "--metrics", "--out"):
        assert option in out


def test_tool_script_missing_checkpoint(tmp_path):
    tool = os.path.join(ROOT, "tools", "analyze_routing.py")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, tool, str(tmp_path / "missing_ckpt"), "--tokens-npy", "x.npy"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing_ckpt" in lines[0] and "does not exist" in lines[0], res.stderr
