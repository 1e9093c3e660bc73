"""Decoder LM: layer layout, GQA, tied embeddings, init, activation checkpointing."""

import copy

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import ModelConfig, MoEConfig, preset
from megamoe.model.rope import apply_rope, rope_cache
from megamoe.model.mlp import SwiGLU
from megamoe.model.transformer import build_model, flops_per_token
from megamoe.moe.layer import MoELayer


def small_cfg(**kw):
    moe = kw.pop("moe", MoEConfig(num_experts=4, top_k=2, expert_hidden=32))
    return ModelConfig(vocab_size=64, d_model=32, num_layers=4, num_heads=4, ffn_hidden=64,
                       seq_length=16, moe=moe, **kw)


def test_dense_and_moe_layer_layout():
    cfg = small_cfg(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, first_k_dense=1,
                                  moe_layer_freq=2, num_shared_experts=2))
    model = build_model(cfg, seed=0)
    kinds = [type(model.layers[str(i)].ffn) for i in range(4)]
    assert kinds == [SwiGLU, MoELayer, SwiGLU, MoELayer]
    assert model.layers["1"].ffn.shared_experts.gate_proj.out_features == 64  # 2 x 32
    dense = build_model(small_cfg(moe=None), seed=0)
    assert not dense.moe_layers()


def test_forward_shapes_gqa_and_tied():
    cfg = small_cfg(num_kv_heads=2, tie_embeddings=True, qk_norm=True)
    model = build_model(cfg, seed=0)
    assert model.lm_head.weight is model.embed.weight
    assert model.layers["0"].attn.k_proj.out_features == 2 * 8
    logits = model(torch.randint(0, 64, (2, 16)))
    assert logits.shape == (2, 16, 64)


def test_causality():
    model = build_model(small_cfg(), seed=0).eval()
    x = torch.randint(0, 64, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 64
    torch.testing.assert_close(model(x)[0, :10], model(y)[0, :10])


def test_init_is_truncated_normal_and_seeded():
    a, b = build_model(small_cfg(), seed=3), build_model(small_cfg(), seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    w = a.layers["0"].attn.q_proj.weight
    assert w.abs().max() <= 3 * 0.02 + 1e-7 and 0.01 < w.std() < 0.03
    assert torch.equal(a.layers["0"].attn_norm.weight, torch.ones(32))


def test_rope_rotates_relative_positions():
    cos, sin = rope_cache(8, 4, 10000.0)
    q = torch.randn(1, 1, 1, 4).expand(1, 1, 8, 4)
    k = torch.randn(1, 1, 1, 4).expand(1, 1, 8, 4)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # <q_i, k_j> depends only on i - j
    torch.testing.assert_close((qr[0, 0, 3] * kr[0, 0, 1]).sum(), (qr[0, 0, 6] * kr[0, 0, 4]).sum())


@pytest.mark.parametrize("moe", [True, False])
@pytest.mark.parametrize("selective", [False, True])
@pytest.mark.parametrize("post_norm", [False, True])
def test_activation_checkpointing_same_loss_and_grads(moe, selective, post_norm):
    """Full and selective recompute give the gradients of no recompute (fp64: same math)."""
    cfg = small_cfg() if moe else small_cfg(moe=None)
    cfg.norm_position = "post" if post_norm else "pre"
    ref = build_model(cfg, seed=0).double()
    ac = copy.deepcopy(ref)
    ac.set_activation_checkpointing(True, selective=selective)
    x = torch.randint(0, 64, (2, 16))
    for m in (ref, ac):
        m.train()
        F.cross_entropy(m(x).reshape(-1, 64), x.reshape(-1)).backward()
    for (n, p), q in zip(ref.named_parameters(), ac.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=n)


def test_selective_recompute_keeps_the_token_exchange_out_of_backward():
    """Under selective recompute the dispatcher runs once per forward; under full recompute
    again in backward (what would be a second all-to-all pair with expert parallelism)."""
    calls = {}
    for mode in ("none", "selective", "full"):
        model = build_model(small_cfg(), seed=0)
        if mode != "none":
            model.set_activation_checkpointing(True, selective=mode == "selective")
        count = [0]
        for layer in model.moe_layers():
            real = layer.dispatcher.dispatch_start

            def dispatch_start(*args, _real=real, **kwargs):
                count[0] += 1
                return _real(*args, **kwargs)
            layer.dispatcher.dispatch_start = dispatch_start
        model.train()
        x = torch.randint(0, 64, (2, 16))
        F.cross_entropy(model(x).reshape(-1, 64), x.reshape(-1)).backward()
        calls[mode] = count[0]
    layers = len(build_model(small_cfg(), seed=0).moe_layers())
    assert calls == {"none": layers, "selective": layers, "full": 2 * layers}


def test_flops_per_token_olmoe_magnitude():
    # OLMoE-1B-7B has ~1.3B active parameters -> ~6 * 1.3e9 = ~8e9 FLOPs/token + attention.
    f = flops_per_token(preset("olmoe-1b-7b").model)
    assert 7e9 < f < 1.5e10
