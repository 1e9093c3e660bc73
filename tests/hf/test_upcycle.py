"""Dense -> MoE upcycling: what the upcycled model reproduces at initialisation, and where."""

import numpy as np
import pytest
import torch

from hfutil import dense_llama, max_diff, save_megamoe, tokens
from megamoe.cli import main as cli_main
from megamoe.config import ModelConfig, MoEConfig
from megamoe.hf.convert import megamoe_to_hf
from megamoe.hf.io import load_megamoe_state
from megamoe.hf.layouts import config_to_hf
from megamoe.hf.upcycle import kmeans_partition, random_partition, upcycle
from megamoe.model.transformer import build_model

TOL = 1e-5


def _build(cfg, state):
    model = build_model(cfg)
    model.load_state_dict(state)
    return model.eval()


def test_copy_mode_reproduces_dense_model():
    cfg, dense = dense_llama()
    new_cfg, state, _ = upcycle(cfg, dense.state_dict(), num_experts=4, top_k=2, mode="copy")
    assert new_cfg.moe.router_mode == "topk_softmax" and new_cfg.moe.expert_hidden == cfg.ffn_hidden
    moe = _build(new_cfg, state)
    x = tokens()
    with torch.no_grad():
        assert max_diff(moe(x), dense(x)) < TOL
    # Every expert is the FFN; the router is new, N(0, 0.02).
    w = state["layers.1.ffn.experts.w_gate_up"]
    assert all(torch.equal(w[0], w[e]) for e in range(4))
    assert abs(float(state["layers.1.ffn.router.weight"].std()) - 0.02) < 0.005
    config_to_hf(new_cfg, "mixtral")  # exportable as is


def test_copy_mode_without_renormalisation_scales_the_ffn():
    """softmax_topk without norm_topk_prob weights the k copies by their probability mass (< 1):
    the upcycled model is then not the dense one. Documented, and why copy defaults to topk_softmax."""
    cfg, dense = dense_llama()
    new_cfg, state, _ = upcycle(cfg, dense.state_dict(), 4, 2, mode="copy", router_mode="softmax_topk")
    x = tokens()
    with torch.no_grad():
        assert max_diff(_build(new_cfg, state)(x), dense(x)) > 1e-3
    new_cfg, state, _ = upcycle(cfg, dense.state_dict(), 4, 2, mode="copy", router_mode="softmax_topk",
                                norm_topk_prob=True)
    with torch.no_grad():
        assert max_diff(_build(new_cfg, state)(x), dense(x)) < TOL


@pytest.mark.parametrize("method", ["random", "kmeans"])
def test_split_mode_with_all_experts_reproduces_dense_model(method):
    """FFN(x) = sum_e expert_e(x) over a neuron partition; with top_k = E and a uniform router
    (router_std 0) every expert gets weight (1/E) * routed_scaling_factor E = 1."""
    cfg, dense = dense_llama()
    new_cfg, state, parts = upcycle(cfg, dense.state_dict(), num_experts=4, top_k=4, mode="split",
                                    split_method=method, router_std=0.0, seed=3)
    assert new_cfg.moe.expert_hidden == 16 and new_cfg.moe.routed_scaling_factor == 4.0
    for layer_parts in parts.values():  # a partition into equal groups
        assert sorted(np.concatenate(layer_parts).tolist()) == list(range(64))
        assert all(len(p) == 16 for p in layer_parts)
    x = tokens()
    moe = _build(new_cfg, state)
    with torch.no_grad():
        assert max_diff(moe(x), dense(x)) < TOL
    # With top_k < E the layer starts as the partial sum over the chosen experts.
    new_cfg, state, _ = upcycle(cfg, dense.state_dict(), 4, 2, mode="split", split_method=method)
    with torch.no_grad():
        assert max_diff(_build(new_cfg, state)(x), dense(x)) > 1e-3


def test_partitions_are_seeded_and_kmeans_finds_clusters():
    assert all(np.array_equal(a, b) for a, b in zip(random_partition(64, 4, 1), random_partition(64, 4, 1)))
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 10
    truth = rng.permutation(np.repeat(np.arange(4), 16))     # 4 planted clusters of 16 neurons
    feats = centers[truth] + rng.normal(size=(64, 8)) * 0.1
    parts = kmeans_partition(feats, 4, seed=0)
    found = {frozenset(p.tolist()) for p in parts}
    assert found == {frozenset(np.flatnonzero(truth == c).tolist()) for c in range(4)}
    again = kmeans_partition(feats, 4, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_upcycle_cli_from_hf_llama_dir(tmp_path, capsys):
    cfg, dense = dense_llama()
    megamoe_to_hf(save_megamoe(tmp_path / "run", cfg, dense), str(tmp_path / "llama"))
    assert cli_main(["upcycle", str(tmp_path / "llama"), str(tmp_path / "moe"), "--num-experts", "4",
                     "--top-k", "2"]) == 0
    assert "4 experts" in capsys.readouterr().out
    new_cfg, state = load_megamoe_state(str(tmp_path / "moe"))
    x = tokens()
    with torch.no_grad():
        assert max_diff(_build(new_cfg, state)(x), dense(x)) < TOL
    # Keep the first layer dense.
    assert cli_main(["upcycle", str(tmp_path / "run"), str(tmp_path / "moe2"), "--num-experts", "4",
                     "--top-k", "4", "--mode", "split", "--router-std", "0", "--first-k-dense", "1"]) == 0
    new_cfg, state = load_megamoe_state(str(tmp_path / "moe2"))
    assert "layers.0.ffn.gate_proj.weight" in state and "layers.1.ffn.experts.w_down" in state
    with torch.no_grad():
        assert max_diff(_build(new_cfg, state)(x), dense(x)) < TOL


def test_upcycle_refusals(tmp_path, capsys):
    cfg, dense = dense_llama()
    with pytest.raises(ValueError, match="divisible"):
        upcycle(cfg, dense.state_dict(), num_experts=3, top_k=1, mode="split")
    with pytest.raises(ValueError, match="top_k"):
        upcycle(cfg, dense.state_dict(), num_experts=4, top_k=5)
    moe_cfg = ModelConfig(moe=MoEConfig())
    with pytest.raises(ValueError, match="already MoE"):
        upcycle(moe_cfg, {}, 4, 2)
    biased = ModelConfig(bias=True, moe=None)
    with pytest.raises(ValueError, match="biases"):
        upcycle(biased, {}, 4, 2)
    assert cli_main(["upcycle", str(tmp_path / "missing"), str(tmp_path / "o"), "--num-experts", "4",
                     "--top-k", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_split_upcycle_cli_streams_and_exports_with_special_tokens(tmp_path, capsys):
    """CLI: an HF llama directory (with a tokenizer and an EOS id) -> split-upcycled megamoe
    out_dir (model-only sharded weights, tokenizer kept) -> to-hf as qwen2_moe with the
    routed scaling folded in: transformers computes the megamoe logits and knows the EOS."""
    import json
    import os

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    pytest.importorskip("transformers")
    from hfutil import load_hf

    cfg, dense = dense_llama()
    megamoe_to_hf(save_megamoe(tmp_path / "run", cfg, dense), str(tmp_path / "llama"),
                  token_ids={"eos_token_id": 1})
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["a b c"] * 5, trainers.BpeTrainer(vocab_size=60, special_tokens=["<s>", "</s>"]))
    tk.save(str(tmp_path / "llama" / "tokenizer.json"))
    assert cli_main(["upcycle", str(tmp_path / "llama"), str(tmp_path / "moe"), "--num-experts", "4",
                     "--top-k", "2", "--mode", "split", "--router-std", "0.3"]) == 0
    step = tmp_path / "moe" / "checkpoints" / "step_00000000"
    assert "metadata.json" in os.listdir(step) and "model.pt" not in os.listdir(step)
    assert (tmp_path / "moe" / "tokenizer.json").is_file()
    new_cfg, state = load_megamoe_state(str(tmp_path / "moe"))
    assert new_cfg.moe.routed_scaling_factor == 4.0
    # Same partitions and routers as the function API (the stream draws them in the same order).
    _, api_state, _ = upcycle(cfg, dense.state_dict(), 4, 2, mode="split", router_std=0.3)
    assert all(torch.equal(api_state[k], state[k]) for k in api_state)

    assert cli_main(["convert", "to-hf", str(tmp_path / "moe"), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "qwen2_moe" in out and "folded routed_scaling_factor 4" in out
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["eos_token_id"] == 1
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "llama" / "tokenizer.json").read_bytes()
    hf = load_hf(tmp_path / "hf")
    x = tokens()
    with torch.no_grad():
        assert max_diff(_build(new_cfg, state)(x), hf(x).logits) < 1e-4
