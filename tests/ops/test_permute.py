"""permute / unpermute / sort_by_expert: C++ (and CUDA) kernels vs torch fallback vs naive loops.

Legend: T tokens, K experts per token, E experts, N valid (non-dropped) slots, H hidden.
"""

import importlib

import pytest
import torch

from megamoe import ops

# The submodule, not the function of the same name that megamoe.ops re-exports.
permute_mod = importlib.import_module("megamoe.ops.permute")

HAS_EXT = permute_mod._ext is not None
BACKENDS = ["ext", "torch"]

# (T, K, E, H, drop fraction, expert E-1 left empty)
CASES = [
    (0, 2, 4, 8, 0.0, False),       # no tokens at all
    (1, 1, 1, 3, 0.0, False),       # single expert, K=1
    (7, 1, 3, 5, 0.0, False),       # K=1
    (13, 2, 5, 16, 0.0, True),      # an expert with zero tokens
    (37, 4, 8, 33, 0.3, False),     # dropped slots, odd H
    (64, 8, 16, 64, 0.2, True),     # OLMoE-like top-8, drops and an empty expert
    (6, 3, 4, 4, 1.0, False),       # every slot dropped
]


def make_routing(T, K, E, drop, empty_last, seed, device="cpu"):
    """topk_idx[T, K] of distinct experts per token; some slots set to -1 (dropped)."""
    g = torch.Generator().manual_seed(seed)
    usable = E - 1 if empty_last else E
    idx = torch.rand(T, usable, generator=g).argsort(dim=1)[:, :K]
    if drop > 0:
        idx[torch.rand(T, K, generator=g) < drop] = -1
    return idx.to(device)


def use_backend(monkeypatch, name):
    if name == "ext" and not HAS_EXT:
        pytest.skip(f"megamoe._permute not built ({permute_mod._EXT_ERROR})")
    monkeypatch.setenv("MEGAMOE_OPS_BACKEND", name)


# ---------------------------------------------------------------------------------------------
# Naive references: plain Python loops over experts / tokens / slots
# ---------------------------------------------------------------------------------------------

def naive_sort(topk_idx, E):
    T, K = topk_idx.shape
    idx = topk_idx.tolist()
    perm = [t * K + k for e in range(E) for t in range(T) for k in range(K) if idx[t][k] == e]
    dropped = [t * K + k for t in range(T) for k in range(K) if idx[t][k] < 0]
    counts = [sum(row.count(e) for row in idx) for e in range(E)]
    return perm, dropped, counts


def naive_permute(x, topk_idx, E):
    K = topk_idx.shape[1]
    perm, _, counts = naive_sort(topk_idx, E)
    rows = [x[s // K] for s in perm]
    # x.sum() * 0 keeps an (all-zero) autograd edge to x when no row is selected.
    x_perm = torch.stack(rows) if rows else x.new_zeros((0, x.shape[1])) + x.sum() * 0
    return x_perm, torch.tensor(perm, dtype=torch.long), torch.tensor(counts, dtype=torch.long)


def naive_unpermute(y_perm, perm_map, weights):
    """Per token, sum over k in order in fp32/fp64 (the kernels' order); differentiable."""
    T, K = weights.shape
    acc = torch.float64 if y_perm.dtype == torch.float64 else torch.float32
    row_of = {s: r for r, s in enumerate(perm_map.tolist())}
    out = []
    for t in range(T):
        total = torch.zeros(y_perm.shape[1], dtype=acc)
        for k in range(K):
            r = row_of.get(t * K + k)
            if r is not None:
                total = total + weights[t, k].to(acc) * y_perm[r].to(acc)
        out.append(total.to(y_perm.dtype))
    y = torch.stack(out) if out else y_perm.new_zeros((0, y_perm.shape[1]))
    # Zero term that keeps autograd edges to both inputs even when nothing was summed
    # (T = 0, or every slot dropped), so their gradients are zeros rather than None.
    return y + ((y_perm.sum() + weights.sum()) * 0).to(y.dtype)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,E,H,drop,empty", CASES)
def test_sort_by_expert(monkeypatch, backend, T, K, E, H, drop, empty):
    use_backend(monkeypatch, backend)
    idx = make_routing(T, K, E, drop, empty, seed=T)
    perm_map, counts, offsets = ops.sort_by_expert(idx, E)
    perm, dropped, naive_counts = naive_sort(idx, E)
    assert perm_map.dtype == torch.int64 and counts.dtype == torch.int64 and offsets.dtype == torch.int32
    assert perm_map.tolist() == perm + dropped           # valid first, dropped at the tail
    assert counts.tolist() == naive_counts
    assert offsets.tolist() == torch.tensor(naive_counts).cumsum(0).tolist()
    if empty:
        assert counts[-1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sort_by_expert_large_is_stable(monkeypatch, backend):
    """Enough slots for the C++ counting sort to split into parallel chunks."""
    use_backend(monkeypatch, backend)
    T, K, E = 9000, 8, 64
    idx = make_routing(T, K, E, 0.1, False, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)      # 72000 slots -> 4 chunks of >= 16384, even on a 1-core runner
    try:
        perm_map, counts, offsets = ops.sort_by_expert(idx, E)
    finally:
        torch.set_num_threads(threads)
    keys = torch.where(idx.reshape(-1) < 0, E, idx.reshape(-1))
    expected = torch.argsort(keys, stable=True)
    assert torch.equal(perm_map, expected)
    assert torch.equal(counts, torch.bincount(keys, minlength=E + 1)[:E])
    assert int(offsets[-1]) == int((idx >= 0).sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,E,H,drop,empty", CASES)
def test_forward_matches_naive(monkeypatch, backend, T, K, E, H, drop, empty):
    use_backend(monkeypatch, backend)
    torch.manual_seed(0)
    idx = make_routing(T, K, E, drop, empty, seed=T + 1)
    x = torch.randn(T, H)
    x_perm, perm_map, counts = ops.permute(x, idx, E)
    ref_perm, ref_map, ref_counts = naive_permute(x, idx, E)
    assert torch.equal(x_perm, ref_perm)
    assert torch.equal(perm_map, ref_map)
    assert torch.equal(counts, ref_counts)
    assert x_perm.shape[0] == int((idx >= 0).sum())

    y_perm = torch.randn_like(x_perm)
    w = torch.rand(T, K)
    y = ops.unpermute(y_perm, perm_map, w)
    ref = naive_unpermute(y_perm, perm_map, w)
    assert y.shape == (T, H) and y.dtype == y_perm.dtype
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def test_dropped_slots_contribute_zero():
    """A token whose slots are all dropped unpermutes to exactly zero on every backend."""
    idx = torch.tensor([[0, 1], [-1, -1], [1, -1]])
    x = torch.arange(6, dtype=torch.float32).view(3, 2)
    x_perm, perm_map, counts = ops.permute(x, idx, 2)
    assert perm_map.tolist() == [0, 1, 4] and counts.tolist() == [1, 2]
    y = ops.unpermute(x_perm, perm_map, torch.ones(3, 2))
    assert torch.equal(y, torch.tensor([[0.0, 2.0], [0.0, 0.0], [4.0, 5.0]]))


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------

def moe_like_roundtrip(x, idx, E, w, proj):
    """permute -> a row-wise function -> unpermute, like an MoE layer with one shared 'expert'."""
    x_perm, perm_map, _ = ops.permute(x, idx, E)
    return ops.unpermute(torch.tanh(x_perm @ proj), perm_map, w)


def naive_roundtrip(x, idx, E, w, proj):
    x_perm, perm_map, _ = naive_permute(x, idx, E)
    return naive_unpermute(torch.tanh(x_perm @ proj), perm_map, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,K,E,H,drop,empty", CASES)
def test_gradients_match_naive(monkeypatch, backend, T, K, E, H, drop, empty):
    use_backend(monkeypatch, backend)
    torch.manual_seed(1)
    idx = make_routing(T, K, E, drop, empty, seed=T + 2)
    x0, w0, proj = torch.randn(T, H), torch.rand(T, K), torch.randn(H, H) / H ** 0.5
    grad_out = torch.randn(T, H)

    grads = []
    for fn in (moe_like_roundtrip, naive_roundtrip):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        fn(x, idx, E, w, proj).backward(grad_out)
        grads.append((x.grad, w.grad))
    (gx, gw), (ref_gx, ref_gw) = grads
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    assert torch.all(gw[idx < 0] == 0)        # dropped slots: zero weight gradient


@pytest.mark.parametrize("T,K,E,H,drop,empty", CASES)
def test_ext_matches_torch_fallback(monkeypatch, T, K, E, H, drop, empty):
    """Forward and all three gradients (x, y_perm, weights) agree between the two backends."""
    if not HAS_EXT:
        pytest.skip("megamoe._permute not built")
    torch.manual_seed(2)
    idx = make_routing(T, K, E, drop, empty, seed=T + 3)
    x0, w0 = torch.randn(T, H), torch.rand(T, K)
    results = {}
    for name in BACKENDS:
        monkeypatch.setenv("MEGAMOE_OPS_BACKEND", name)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        x_perm, perm_map, counts = ops.permute(x, idx, E)
        y_perm = (x_perm * 2.0).detach().requires_grad_()   # an independent leaf for its grad
        y = ops.unpermute(y_perm, perm_map, w)
        (y.square().sum() + x_perm.sum()).backward()
        results[name] = (x_perm, perm_map, counts, y, x.grad, y_perm.grad, w.grad)
    for a, b in zip(results["ext"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    torch.manual_seed(3)
    T, K, E, H = 6, 3, 4, 5
    idx = make_routing(T, K, E, 0.25, False, seed=4)
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_: ops.permute(x_, idx, E)[0], (x,))

    _, perm_map, _ = ops.permute(x.detach(), idx, E)
    y_perm = torch.randn(perm_map.numel(), H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y_, w_: ops.unpermute(y_, perm_map, w_), (y_perm, w))


# ---------------------------------------------------------------------------------------------
# Reduced precision, dtypes, layouts
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_cpu(monkeypatch, dtype):
    """bf16/fp16 data with fp32 router weights: backends agree, sums accumulate in fp32."""
    T, K, E, H = 40, 4, 8, 24
    idx = make_routing(T, K, E, 0.2, False, seed=5)
    torch.manual_seed(5)
    x0, w0 = torch.randn(T, H, dtype=dtype), torch.rand(T, K)
    results = {}
    for name in BACKENDS:
        use_backend(monkeypatch, name)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        x_perm, perm_map, _ = ops.permute(x, idx, E)
        y = ops.unpermute(x_perm * 1.5, perm_map, w)
        y.float().square().sum().backward()
        assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == torch.float32
        results[name] = (x_perm, y, x.grad, w.grad)
    ref_perm, ref_map, _ = naive_permute(x0, idx, E)
    ref_y = naive_unpermute(ref_perm * 1.5, ref_map, w0)
    for name, (x_perm, y, gx, gw) in results.items():
        assert torch.equal(x_perm, ref_perm), name
        torch.testing.assert_close(y, ref_y, msg=name)
    for a, b in zip(results["ext"], results["torch"]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_int32_inputs(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    T, K, E, H = 9, 2, 3, 6
    idx = make_routing(T, K, E, 0.0, False, seed=6)
    x = torch.randn(H, T).t()                          # non-contiguous view
    x_perm, perm_map, _ = ops.permute(x, idx.int(), E)
    assert torch.equal(x_perm, naive_permute(x.contiguous(), idx, E)[0])
    w = torch.rand(K, T).t()
    y = ops.unpermute(x_perm, perm_map, w)
    torch.testing.assert_close(y, naive_unpermute(x_perm, perm_map, w), rtol=1e-6, atol=1e-6)


def test_grouped_mm_with_offsets():
    """offsets from sort_by_expert drive torch._grouped_mm: permute -> experts -> unpermute."""
    T, K, E, H, F = 24, 2, 4, 8, 16
    idx = make_routing(T, K, E, 0.2, True, seed=7)
    torch.manual_seed(7)
    x, w, W = torch.randn(T, H), torch.rand(T, K), torch.randn(E, H, F)
    perm_map, _, offsets = ops.sort_by_expert(idx, E)
    n = int(offsets[-1])
    x_perm = ops.permute_with_map(x, perm_map[:n], K)
    try:
        h = torch._grouped_mm(x_perm, W, offs=offsets)
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch._grouped_mm unavailable on CPU here: {err}")
    y = ops.unpermute(h, perm_map[:n], w)
    ref = torch.zeros(T, F)
    for t in range(T):
        for k in range(K):
            if idx[t, k] >= 0:
                ref[t] += w[t, k] * (x[t] @ W[idx[t, k]])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors and backend selection
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x = torch.randn(3, 4)
    with pytest.raises((RuntimeError, ValueError)):
        ops.permute(x, torch.tensor([[0], [5], [1]]), 4)       # expert index >= E
    with pytest.raises(ValueError):
        ops.permute(x, torch.tensor([[0], [-1], [1]]), 4, num_valid=3)
    with pytest.raises(ValueError):
        ops.permute(x, torch.tensor([[0], [1]]), 4)             # T mismatch


def test_bad_perm_map_raises_in_ext(monkeypatch):
    use_backend(monkeypatch, "ext")
    y_perm, w = torch.randn(2, 4), torch.rand(2, 1)
    with pytest.raises(RuntimeError):
        ops.unpermute(y_perm, torch.tensor([0, 0]), w)          # the same slot twice
    with pytest.raises(RuntimeError):
        ops.unpermute(y_perm, torch.tensor([0, 7]), w)          # slot out of range


def test_backend_selection(monkeypatch):
    monkeypatch.setenv("MEGAMOE_OPS_BACKEND", "torch")
    assert ops.backend("cpu") == "torch"
    monkeypatch.setenv("MEGAMOE_OPS_BACKEND", "auto")
    assert ops.backend("cpu") == ("cpp" if HAS_EXT else "torch")
    monkeypatch.setenv("MEGAMOE_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError):
        ops.backend("cpu")


# ---------------------------------------------------------------------------------------------
# GPU: CUDA kernels vs the torch fallback, and no host syncs in index building
# ---------------------------------------------------------------------------------------------

def require_cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if ops.backend("cuda") != "cuda":
        pytest.skip(f"megamoe._permute has no CUDA kernels here (import error: {permute_mod._EXT_ERROR})")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("T,K,E,H,drop", [
    (0, 2, 4, 8, 0.0),
    (1, 1, 1, 3, 0.0),
    (257, 2, 8, 4096, 0.0),      # Mixtral-like, 16-byte packs
    (300, 8, 64, 2048, 0.1),     # OLMoE-like with drops
    (129, 4, 6, 33, 0.3),        # odd H: scalar path
    (5000, 6, 160, 40, 0.05),    # many experts, H a multiple of 8 but not 16 bytes for fp32
])
def test_cuda_matches_torch_fallback(monkeypatch, dtype, T, K, E, H, drop):
    monkeypatch.setenv("MEGAMOE_OPS_BACKEND", "auto")
    require_cuda_kernels()
    idx = make_routing(T, K, E, drop, False, seed=T, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(T)
    x0 = torch.randn(T, H, device="cuda", generator=gen).to(dtype)
    w0 = torch.rand(T, K, device="cuda", generator=gen)
    results = {}
    for name in BACKENDS:
        monkeypatch.setenv("MEGAMOE_OPS_BACKEND", name)
        sort_out = ops.sort_by_expert(idx, E)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        x_perm, perm_map, counts = ops.permute(x, idx, E)
        y_perm = (x_perm.float() * 0.5).to(dtype).detach().requires_grad_()
        y = ops.unpermute(y_perm, perm_map, w)
        (y.float().square().sum() + x_perm.float().sum()).backward()
        results[name] = (*sort_out, x_perm, perm_map, counts, y, x.grad, y_perm.grad, w.grad)
    tol = {} if dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(results["ext"], results["torch"]):
        if a.dtype in (torch.int32, torch.int64):
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_index_building_has_no_host_sync(monkeypatch, backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    use_backend(monkeypatch, backend)
    if backend == "ext":
        require_cuda_kernels()
    T, K, E, H = 4096, 8, 64, 256
    idx = make_routing(T, K, E, 0.1, False, seed=8, device="cuda")
    x = torch.randn(T, H, device="cuda", requires_grad=True)
    w = torch.rand(T, K, device="cuda", requires_grad=True)
    ops.sort_by_expert(idx, E)                # warm up: lazy init may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        perm_map, counts, offsets = ops.sort_by_expert(idx, E)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(offsets[-1]) == int((idx >= 0).sum()) and int(counts.sum()) == int(offsets[-1])

    if backend == "ext":
        # Dropless routing with num_valid known: the whole fwd+bwd round trip stays sync-free.
        dropless = make_routing(T, K, E, 0.0, False, seed=9, device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            x_perm, perm_map, _ = ops.permute(x, dropless, E, num_valid=T * K)
            ops.unpermute(x_perm * 2, perm_map, w).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert x.grad is not None and w.grad is not None
