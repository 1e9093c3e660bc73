"""MoELayer: grouped_mm backend == loop backend == dense all-experts reference (fwd + grads)."""

import pytest
import torch
import torch.nn.functional as F

from megamoe.config import MoEConfig
from megamoe.moe.layer import MoELayer


def make_layer(seed=0, **kw):
    cfg = MoEConfig(num_experts=kw.pop("num_experts", 8), top_k=kw.pop("top_k", 2),
                    expert_hidden=kw.pop("expert_hidden", 32), **kw)
    torch.manual_seed(seed)
    layer = MoELayer(16, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def dense_reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, masked by the routing weights."""
    x2 = x.reshape(-1, x.shape[-1])
    route = layer.router(x2)
    E = layer.cfg.num_experts
    weights = torch.zeros(x2.shape[0], E).scatter_add(1, route.topk_idx, route.topk_weight)  # [T, E]
    gate_up = torch.einsum("th,ehi->eti", x2, layer.experts.w_gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    y_all = torch.einsum("eti,eih->eth", F.silu(gate) * up, layer.experts.w_down)          # [E, T, H]
    y = torch.einsum("eth,te->th", y_all, weights)
    if layer.shared_experts is not None:
        shared = layer.shared_experts(x2)
        if layer.shared_expert_gate is not None:
            shared = torch.sigmoid(layer.shared_expert_gate(x2)) * shared
        y = y + shared
    return y.reshape(x.shape)


def run(layer, x, backend):
    layer.experts.backend = backend
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    if backend == "dense":
        y = dense_reference(layer, x)
    else:
        y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("mode", ["softmax_topk", "topk_softmax", "sigmoid_bias"])
@pytest.mark.parametrize("shared", [0, 1])
def test_backends_match_dense_reference(mode, shared):
    layer = make_layer(router_mode=mode, num_shared_experts=shared, shared_expert_gate=bool(shared),
                       norm_topk_prob=(mode == "sigmoid_bias"), lb_loss_coef=0.0, z_loss_coef=0.0)
    layer.eval()  # no aux-loss gradient: compare the pure data path
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(2))
    ref_y, ref_gx, ref_g = run(layer, x, "dense")
    for backend in ("grouped_mm", "loop"):
        y, gx, g = run(layer, x, backend)
        torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx, ref_gx, atol=1e-5, rtol=1e-5)
        for name in ref_g:
            torch.testing.assert_close(g[name], ref_g[name], atol=1e-5, rtol=1e-5, msg=name)


def test_expert_with_no_tokens():
    layer = make_layer(num_experts=8, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3, 0] = 10.0  # every token with x[..., 0] > 0 goes to expert 3
    x = torch.randn(2, 5, 16).abs()
    for backend in ("grouped_mm", "loop"):
        _, _, g = run(layer, x, backend)
        assert g["experts.w_down"][0].abs().sum() == 0  # expert 0 saw nothing
        assert g["experts.w_down"][3].abs().sum() > 0


def test_aux_loss_reaches_router_gradient():
    """grad(with aux) - grad(without aux) == grad of the load-balancing loss alone."""
    layer = make_layer(lb_loss_coef=1.0, z_loss_coef=0.0)
    layer.train()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    layer(x).sum().backward()
    with_aux = layer.router.weight.grad.clone()
    layer.zero_grad()
    layer.cfg.lb_loss_coef = 0.0
    layer(x).sum().backward()
    without_aux = layer.router.weight.grad.clone()
    layer.zero_grad()
    route = layer.router(x)
    counts = torch.bincount(route.topk_idx.reshape(-1), minlength=8)
    layer.router.load_balancing_loss(route.probs, counts).backward()
    assert with_aux.sub(without_aux).abs().max() > 1e-4
    torch.testing.assert_close(with_aux - without_aux, layer.router.weight.grad, atol=1e-6, rtol=1e-5)


def test_capacity_drops_and_stats():
    layer = make_layer(num_experts=4, top_k=2, capacity_factor=0.5)
    x = torch.randn(32, 16)
    y = layer(x)
    assert y.shape == x.shape
    s = layer.last_stats
    assert s["tokens_per_expert"].max() <= 8  # capacity = ceil(0.5 * 32 * 2 / 4)
    dropped = float(s["dropped_frac"])
    assert 0 < dropped < 1
    assert int(s["tokens_per_expert"].sum()) == round(64 * (1 - dropped))
    # Dropped slots contribute nothing: a token with both slots dropped gets a zero output.



@pytest.mark.parametrize("backend", ["grouped_mm", "loop"])
def test_autocast_runs_experts_in_the_autocast_dtype(backend):
    """torch._grouped_mm is not an autocast op: the layer casts the tokens itself, so the expert
    GEMMs (and the permutation) run in bf16 under autocast; the output stays close to fp32."""
    layer = make_layer()
    layer.experts.backend = backend
    x = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0))
    seen = []
    layer.experts.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    ref = layer(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.clone().requires_grad_(True))
    assert seen == [torch.float32, torch.bfloat16]
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.detach(), ref, atol=0.15, rtol=0.05)
    y.sum().backward()
    assert layer.experts.w_gate_up.grad.dtype == torch.float32
