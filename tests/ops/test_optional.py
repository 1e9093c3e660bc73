"""Optional kernels: used only when configured; each is tested where installed and skips cleanly
where not; asking for a missing one gives a one-line error naming the package."""

import copy
import importlib.util

import pytest
import torch

from megamoe.config import ModelConfig, MoEConfig, OptimConfig, preset
from megamoe.model.norm import RMSNorm, build_norm
from megamoe.moe.experts import grouped_gemm, resolve_gemm_backend
from megamoe.ops import optional
from megamoe.training.build import Backends, apply_precision, resolve_backends
from megamoe.training.optim import build_optimizer

CPU = torch.device("cpu")


def cfg_with(**fields):
    cfg = preset("tiny")
    for dotted, value in fields.items():   # model__norm_impl -> cfg.model.norm_impl
        *parents, name = dotted.split("__")
        target = cfg
        for part in parents:
            target = getattr(target, part)
        setattr(target, name, value)
    return cfg


def test_availability_report_and_torch_defaults():
    av = optional.available()
    assert set(av) == {"grouped_gemm", "apex", "transformer_engine"}
    assert type(build_norm(ModelConfig(), 8)) is RMSNorm


def test_auto_means_torch_even_when_optional_packages_are_installed(monkeypatch):
    """'auto' never picks a package because it can be imported (an NGC image has apex)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name in
                        ("apex", "grouped_gemm", "transformer_engine") else real(name, *a))
    assert all(optional.available().values())
    b = resolve_backends(preset("tiny"), CPU)
    assert (b.norm, b.optimizer, b.fp8) == ("torch", "torch AdamW", False) and b.gemm in ("grouped_mm", "loop")
    assert b.precision == "fp32"


@pytest.mark.parametrize("name, call", [
    ("grouped_gemm", lambda: grouped_gemm(torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor([1, 3]),
                                          "grouped_gemm")),
    ("grouped_gemm", lambda: resolve_gemm_backend("grouped_gemm", CPU, torch.float32)),
    ("apex", lambda: resolve_backends(cfg_with(model__norm_impl="apex"), CPU)),
    ("apex", lambda: resolve_backends(cfg_with(optim__impl="apex"), CPU)),
    ("apex", lambda: build_optimizer(torch.nn.Linear(2, 2), OptimConfig(impl="apex"))),
    ("transformer_engine", lambda: resolve_backends(cfg_with(fp8=True, dtype="bf16"), CPU)),
])
def test_missing_package_gives_clear_error(name, call):
    if optional.available()[name]:
        pytest.skip(f"{name} is installed")
    with pytest.raises(ValueError, match=f"needs the '{name}' package"):
        call()


@pytest.mark.parametrize("fields, message", [
    (dict(fp8=True, dtype="fp32"), "fp8 runs on top of bf16 autocast"),
    (dict(fp8=True, dtype="bf16", parallel__tp=2), "fp8 with parallel.tp > 1 is not supported"),
    (dict(optim__impl="apex", parallel__zero1=True), "does not combine with parallel.zero1"),
    (dict(model__norm_impl="apex", model__norm="layernorm"), "applies to model.norm rmsnorm only"),
])
def test_impossible_backend_combinations_are_one_line_errors(fields, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve_backends(cfg_with(**fields), CPU)
    assert "\n" not in str(err.value)


def test_gemm_backend_auto_is_grouped_mm_only_where_torch_runs_it_well(monkeypatch):
    expected = "grouped_mm" if hasattr(torch, "_grouped_mm") else "loop"
    for dtype in (torch.float32, torch.bfloat16):        # CPU: torch's C++ loop, no device to sync
        assert resolve_gemm_backend("auto", CPU, dtype) == expected
    assert resolve_gemm_backend("auto", CPU, torch.float64) == "loop"    # grouped_mm has no fp64
    assert resolve_gemm_backend("loop", CPU, torch.bfloat16) == "loop"
    gpu = torch.device("cuda", 0)
    for capability, dtype, want in [((9, 0), torch.bfloat16, expected), ((10, 0), torch.bfloat16, expected),
                                    ((8, 0), torch.bfloat16, "loop"), ((9, 0), torch.float32, "loop"),
                                    ((9, 0), torch.float16, "loop")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_gemm_backend("auto", gpu, dtype) == want, (capability, dtype)
    if hasattr(torch, "_grouped_mm"):
        assert resolve_gemm_backend("grouped_mm", CPU, torch.float32) == "grouped_mm"  # as configured
    with pytest.raises(ValueError, match="unknown grouped GEMM backend"):
        resolve_gemm_backend("cutlass", CPU, torch.float32)


def test_backends_line_names_every_choice():
    line = resolve_backends(cfg_with(dtype="bf16"), CPU).describe()
    for part in ("precision bf16 autocast", "fp32 params", "router", "permutation", "grouped GEMM",
                 "norm torch", "optimizer torch AdamW"):
        assert part in line, line


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
    ref = RMSNorm(64).cuda()
    norm = optional.apex_rmsnorm(copy.deepcopy(ref))
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
    apply_precision(model, Backends("bf16", True, "cuda", "grouped_mm", "torch", "torch AdamW"))
    assert any(type(m).__module__.startswith("transformer_engine") for m in model.modules())
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
