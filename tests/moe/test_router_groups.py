"""Group-limited routing (n_group / topk_group) against transformers' DeepSeek routers.

Both sides compute the router in fp32 from the same weights and inputs, so the chosen experts
must be the same sets and the weights equal up to fp32 summation order (1e-6).
"""

import pytest
import torch

from megamoe.config import MoEConfig, TrainConfig, ModelConfig, validate
from megamoe.moe.router import Router

transformers = pytest.importorskip("transformers")

E, K, H, T = 16, 4, 24, 64


def _x(seed=0):
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


def _sorted(idx, weight):
    order = idx.argsort(-1)
    return idx.gather(-1, order), weight.gather(-1, order)


def _megamoe_router(weight, bias=None, **kw):
    r = Router(H, MoEConfig(num_experts=E, top_k=K, **kw))
    with torch.no_grad():
        r.weight.copy_(weight)
        if bias is not None:
            r.expert_bias.copy_(bias)
    return r


@pytest.mark.parametrize("n_group, topk_group", [(4, 2), (8, 3), (4, 4), (1, 1)])
def test_sigmoid_groups_match_deepseek_v3(n_group, topk_group):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = transformers.DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=K,
                                        n_group=n_group, topk_group=topk_group,
                                        routed_scaling_factor=2.5, norm_topk_prob=True)
    ref = DeepseekV3TopkRouter(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(E, H, generator=g) * 0.3)
        ref.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.2)
    ours = _megamoe_router(ref.weight, ref.e_score_correction_bias, router_mode="sigmoid_bias",
                           norm_topk_prob=True, routed_scaling_factor=2.5, n_group=n_group,
                           topk_group=topk_group)
    x = _x()
    _, ref_w, ref_idx = ref(x)
    out = ours(x)
    a, b = _sorted(out.topk_idx, out.topk_weight), _sorted(ref_idx, ref_w)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method, n_group, topk_group", [
    ("group_limited_greedy", 4, 2), ("group_limited_greedy", 8, 1), ("greedy", None, None)])
def test_softmax_groups_match_deepseek_v2(method, n_group, topk_group):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = transformers.DeepseekV2Config(hidden_size=H, num_attention_heads=4, n_routed_experts=E,
                                        num_experts_per_tok=K,
                                        topk_method=method, n_group=n_group, topk_group=topk_group,
                                        routed_scaling_factor=1.5)
    ref = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(2)) * 0.3)
    ours = _megamoe_router(ref.weight, router_mode="softmax_topk", routed_scaling_factor=1.5,
                           n_group=n_group or 1, topk_group=topk_group or 1)
    x = _x(3)
    _, ref_w, ref_idx = ref(x)
    out = ours(x)
    a, b = _sorted(out.topk_idx, out.topk_weight), _sorted(ref_idx, ref_w)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-6)


def test_groups_change_the_choice_and_keep_it_inside_kept_groups():
    w = torch.randn(E, H, generator=torch.Generator().manual_seed(4))
    x = _x(5)
    plain = _megamoe_router(w, router_mode="sigmoid_bias")(x).topk_idx
    grouped = _megamoe_router(w, router_mode="sigmoid_bias", n_group=8, topk_group=1)(x).topk_idx
    assert not torch.equal(plain.sort(-1).values, grouped.sort(-1).values)
    # topk_group 1 of 8 groups of 2, top_k 2 -> each token's experts are one whole group.
    ours = _megamoe_router(w, router_mode="sigmoid_bias", n_group=8, topk_group=1)
    ours.top_k = 2
    idx = ours(x).topk_idx
    assert torch.equal(idx[:, 0] // 2, idx[:, 1] // 2)


@pytest.mark.parametrize("kw, message", [
    (dict(n_group=3), "n_group"),
    (dict(n_group=4, topk_group=5), "topk_group"),
    (dict(n_group=4, topk_group=1, top_k=5), "top_k"),
    (dict(n_group=4, topk_group=2, router_mode="topk_softmax"), "router_mode"),
    (dict(n_group=16, topk_group=4, router_mode="sigmoid_bias"), ">= 2 experts"),
])
def test_group_validation(kw, message):
    moe = MoEConfig(**{**dict(num_experts=E, top_k=K), **kw})
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(model=ModelConfig(moe=moe)))


# ------------------------------------------------------------------ expert parallelism (EP2)

def _grouped_model_cfg():
    return ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, ffn_hidden=64,
                       seq_length=16, moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=16,
                                                    router_mode="sigmoid_bias", norm_topk_prob=True,
                                                    n_group=4, topk_group=2))


def _build_grouped(cfg):
    from megamoe.model.transformer import build_model

    model = build_model(cfg, seed=0).double()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=torch.Generator().manual_seed(7)))
    return model


def _ep_worker(rank, world):
    from megamoe.parallel.mesh import ParallelMesh, make_layout
    from megamoe.parallel.parallelize import parallelize_model

    model = _build_grouped(_grouped_model_cfg())
    model, _ = parallelize_model(model, ParallelMesh(make_layout(world, ep=world), rank))
    data = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(10 + rank))
    logits = model(data)
    logits.sum().backward()
    return {"logits": logits.detach(), "router_grad": model.layers["0"].ffn.router.weight.grad.clone()}


def test_grouped_routing_under_expert_parallelism_matches_one_process():
    """Routing runs before dispatch, on each rank's own tokens: EP2 equals one process (fp64,
    only reduction order differs: 1e-12). Rank 0's tokens and its (local) router gradient."""
    from megamoe.parallel.spawn import spawn

    res = spawn(2, _ep_worker)
    cfg = _grouped_model_cfg()
    model = _build_grouped(cfg)
    data = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(10))
    logits = model(data)
    logits.sum().backward()
    assert (res["logits"] - logits.detach()).abs().max() < 1e-12
    assert (res["router_grad"] - model.layers["0"].ffn.router.weight.grad).abs().max() < 1e-12
    cfg.moe.n_group = cfg.moe.topk_group = 1              # the groups do change the routing
    with torch.no_grad():
        assert (_build_grouped(cfg)(data) - logits).abs().max() > 1e-6
