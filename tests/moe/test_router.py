"""Router semantics per mode, and aux-loss values against hand-computed examples."""

import math

import torch

from megamoe.config import MoEConfig
from megamoe.moe.router import Router


def router_with_logits(mode, logits_rows, top_k, **kw):
    """A router whose logits for one-hot inputs are exactly `logits_rows`."""
    E = len(logits_rows[0])
    r = Router(len(logits_rows), MoEConfig(num_experts=E, top_k=top_k, router_mode=mode, **kw))
    with torch.no_grad():
        r.weight.copy_(torch.tensor(logits_rows, dtype=torch.float32).t())  # [E, T]
    x = torch.eye(len(logits_rows))                                         # token t -> row t
    return r, x


def test_softmax_then_topk_no_renorm():
    r, x = router_with_logits("softmax_topk", [[1.0, 2.0, 3.0, 0.0]], top_k=2)
    out = r(x)
    p = torch.tensor([1.0, 2.0, 3.0, 0.0]).softmax(-1)
    assert out.topk_idx.tolist() == [[2, 1]]
    torch.testing.assert_close(out.topk_weight[0], p[[2, 1]])
    assert out.topk_weight.sum() < 1  # OLMoE does not renormalise


def test_topk_then_softmax_renormalised():
    r, x = router_with_logits("topk_softmax", [[1.0, 2.0, 3.0, 0.0]], top_k=2)
    out = r(x)
    assert out.topk_idx.tolist() == [[2, 1]]
    torch.testing.assert_close(out.topk_weight[0], torch.tensor([3.0, 2.0]).softmax(-1))


def test_sigmoid_bias_selects_with_bias_weights_without():
    r, x = router_with_logits("sigmoid_bias", [[0.0, 1.0, 2.0, 0.5]], top_k=2,
                              norm_topk_prob=True, routed_scaling_factor=2.5)
    r.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))  # bias pulls expert 0 in
    out = r(x)
    assert out.topk_idx.tolist() == [[0, 2]]
    s = torch.tensor([0.0, 2.0]).sigmoid()
    torch.testing.assert_close(out.topk_weight[0], 2.5 * s / s.sum())


def test_bias_update_moves_towards_balance():
    r = Router(4, MoEConfig(num_experts=4, top_k=1, router_mode="sigmoid_bias", bias_update_rate=0.1))
    r.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))


def test_load_balancing_loss_hand_computed():
    # 2 tokens, 2 experts, top-1. probs: t0 = [0.8, 0.2], t1 = [0.6, 0.4]; both pick expert 0.
    r = Router(2, MoEConfig(num_experts=2, top_k=1))
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    counts = torch.tensor([2, 0])
    # f = [1, 0], P = [0.7, 0.3] -> E * sum f*P = 2 * 0.7 = 1.4
    torch.testing.assert_close(r.load_balancing_loss(probs, counts), torch.tensor(1.4))
    # perfectly balanced -> 1
    probs_b = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    torch.testing.assert_close(r.load_balancing_loss(probs_b, torch.tensor([1, 1])), torch.tensor(1.0))


def test_z_loss_hand_computed():
    r = Router(2, MoEConfig(num_experts=2, top_k=1))
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    z0, z1 = math.log(2.0), math.log(math.e + math.e ** 2)
    torch.testing.assert_close(r.z_loss(logits), torch.tensor((z0 ** 2 + z1 ** 2) / 2))


def test_stats_reduce_uses_global_statistics():
    """With a stats_reduce that doubles (two identical shards), the loss is unchanged."""
    r = Router(2, MoEConfig(num_experts=2, top_k=1))
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    counts = torch.tensor([2, 0])
    local = r.load_balancing_loss(probs, counts)
    r.stats_reduce = lambda t: 2 * t
    torch.testing.assert_close(r.load_balancing_loss(probs, counts), local)


def test_router_is_fp32_under_bf16_autocast_in_every_mode():
    """Autocast is disabled inside the router: logits, probs and weights are fp32, and the
    selection (sigmoid_bias included) equals the fp32 router's bit for bit, even where bf16
    logits would tie."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    # near-ties: two experts whose logits differ far below bf16's resolution
    for mode in ("softmax_topk", "topk_softmax", "sigmoid_bias"):
        r = Router(32, MoEConfig(num_experts=8, top_k=2, router_mode=mode, norm_topk_prob=True))
        with torch.no_grad():
            r.weight.normal_(0, 0.02)
            r.weight[1] = r.weight[0] * (1 + 1e-4)
            r.expert_bias.copy_(torch.linspace(-0.01, 0.01, 8))
        ref = r(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = r(x.to(torch.bfloat16))
            out_fp32_in = r(x)
        for field in ("logits", "probs", "topk_weight"):
            assert getattr(out, field).dtype == torch.float32, (mode, field)
        assert torch.equal(out_fp32_in.topk_idx, ref.topk_idx) and torch.equal(out_fp32_in.logits, ref.logits)
        torch.testing.assert_close(out.logits, r(x.to(torch.bfloat16).float()).logits, rtol=0, atol=0)
