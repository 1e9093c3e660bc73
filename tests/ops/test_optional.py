"""Optional kernels: each one is tested where installed and skips cleanly where not; asking for
a missing one gives a one-line error naming the package."""

import pytest
import torch

from megamoe.config import ModelConfig, MoEConfig, OptimConfig
from megamoe.model.norm import RMSNorm, build_norm
from megamoe.moe.experts import grouped_gemm
from megamoe.ops import optional
from megamoe.training.optim import build_optimizer


def test_availability_report_and_torch_defaults():
    av = optional.available()
    assert set(av) == {"grouped_gemm", "apex", "transformer_engine"}
    cfg = ModelConfig(norm_impl="torch")
    assert type(build_norm(cfg, 8)) is RMSNorm


@pytest.mark.parametrize("name, call", [
    ("grouped_gemm", lambda: grouped_gemm(torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor([1, 3]),
                                          "grouped_gemm")),
    ("apex", lambda: build_norm(ModelConfig(norm_impl="apex"), 8)),
    ("apex", lambda: build_optimizer(torch.nn.Linear(2, 2), OptimConfig(impl="apex"))),
    ("transformer_engine", lambda: optional.swap_linears_for_te(torch.nn.Sequential(torch.nn.Linear(2, 2)))),
])
def test_missing_package_gives_clear_error(name, call):
    if optional.available()[name]:
        pytest.skip(f"{name} is installed")
    with pytest.raises(ValueError, match=f"needs the '{name}' package"):
        call()


@pytest.mark.gpu
def test_megablocks_grouped_gemm_matches_grouped_mm():
    pytest.importorskip("grouped_gemm")
    x = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    counts = torch.tensor([10, 0, 30, 24], device="cuda")
    torch.testing.assert_close(grouped_gemm(x, w, counts, "grouped_gemm"),
                               grouped_gemm(x, w, counts, "loop"), atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_apex_fused_rmsnorm_and_adam():
    pytest.importorskip("apex")
    norm = build_norm(ModelConfig(norm_impl="apex"), 64).cuda()
    ref = RMSNorm(64).cuda()
    x = torch.randn(8, 64, device="cuda")
    torch.testing.assert_close(norm(x), ref(x), atol=1e-5, rtol=1e-5)
    model = torch.nn.Linear(4, 4).cuda()
    opt = build_optimizer(model, OptimConfig(impl="apex"))
    assert type(opt).__name__ == "FusedAdam"


@pytest.mark.gpu
def test_transformer_engine_swap_keeps_outputs():
    pytest.importorskip("transformer_engine")
    from megamoe.model.transformer import build_model
    cfg = ModelConfig(vocab_size=128, d_model=64, num_layers=1, num_heads=4, ffn_hidden=128, seq_length=16,
                      moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=64))
    model = build_model(cfg, seed=0).cuda()
    x = torch.randint(0, 128, (2, 16), device="cuda")
    ref = model(x)
    assert optional.swap_linears_for_te(model) > 0
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
