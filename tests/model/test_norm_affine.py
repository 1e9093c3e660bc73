"""Norms without learnable weights (model.norm_affine false: OLMo-1B's non-parametric norm)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import preset
from megamoe.hf.layouts import config_to_hf
from megamoe.model.norm import RMSNorm, build_norm
from megamoe.model.transformer import build_model


def test_rmsnorm_without_weight_is_the_plain_normalisation():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    norm = RMSNorm(16, eps=1e-5, affine=False)
    assert list(norm.parameters()) == []
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    # Same numbers as the affine norm at its initial (all-ones) scale.
    torch.testing.assert_close(norm(x), RMSNorm(16, eps=1e-5).double()(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_build_norm_honours_norm_affine(kind):
    cfg = preset("tiny").model
    cfg.norm, cfg.norm_affine = kind, False
    norm = build_norm(cfg, 8)
    assert list(norm.parameters()) == []
    if kind == "layernorm":
        x = torch.randn(4, 8)
        torch.testing.assert_close(norm(x), F.layer_norm(x, (8,), eps=cfg.norm_eps))
    cfg.norm_affine = True
    assert [n for n, _ in build_norm(cfg, 8).named_parameters()] == ["weight"]


def olmo_like_small():
    cfg = preset("olmo-1b")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.ffn_hidden, m.seq_length = 64, 32, 2, 2, 64, 16
    return cfg


def test_small_olmo_like_model_trains_with_tied_embeddings_and_no_norm_weights():
    cfg = olmo_like_small()
    model = build_model(cfg.model, seed=0)
    assert model.lm_head.weight is model.embed.weight
    assert not any("norm" in n for n, _ in model.named_parameters())
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_hugging_face_export_refuses_non_parametric_norms_in_one_line():
    cfg = olmo_like_small().model
    cfg.norm = "rmsnorm"        # past the RMSNorm check: the missing weights are the problem
    with pytest.raises(ValueError, match="norm_affine=False") as err:
        config_to_hf(cfg, "llama")
    assert "\n" not in str(err.value)
