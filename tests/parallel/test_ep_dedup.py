"""Deduplicated expert-parallel dispatch (one copy of a token per destination EP rank) against
the per-expert path (one copy per selected expert) and against one process, in fp64.

Dispatcher level (real gloo processes): every rank routes its own tokens with top-2 or top-4,
including tokens whose experts all sit on one rank (for every rank), tokens with a dropped slot
and a token with every slot dropped (capacity-limited routing, topk_idx == -1). The experts are
SwiGLU-like functions with parameters sharded the way shard_experts does (E/ep experts per rank,
an I/etp slice of their hidden dim under expert-TP). Checked for EP2, EP4, ETP2 (ep 1) and
EP2xETP2:
  - the expert-major rows handed to the experts are bit-identical to the per-expert path (same
    rows, same order), and so are counts_local;
  - outputs and the gradients w.r.t. the input, the routing weights and the expert parameters
    match the per-expert path and a single-process reference within 1e-12: the two paths differ
    only in the order of floating-point sums (a token's weighted expert outputs are summed per
    EP rank first and then over ranks; the input gradient likewise), ~1e-16 per operation;
  - fewer rows cross the network: one per (token, remote rank) pair.
Model level: TP2 x EP2 with sequence parallelism (world 2), top-2 and top-4: the loss and every
parameter gradient of one forward/backward with dedup equal those without, within 1e-12.
"""

import pytest
import torch
import torch.nn.functional as F

import parallel_harness as H

TOL = 1e-12
T, HID, INTER = 12, 8, 6


def _routing(rank: int, num_experts: int, ep: int, top_k: int) -> torch.Tensor:
    """[T, K] expert ids: random distinct experts, plus tokens whose experts all sit on one EP
    rank (one such token per rank), a token with its second slot dropped and one fully dropped."""
    g = torch.Generator().manual_seed(100 + rank)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(T)])
    el = num_experts // ep
    assert top_k <= el
    for r in range(ep):                                    # all of token r's experts on rank r
        idx[r] = r * el + torch.randperm(el, generator=g)[:top_k]
    idx[ep, 1] = -1                                        # one dropped slot
    idx[ep + 1] = -1                                       # every slot dropped
    return idx


def _expert_params(num_experts: int):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(num_experts, HID, 2 * INTER, dtype=torch.float64, generator=g) / HID ** 0.5
    b = torch.randn(num_experts, INTER, HID, dtype=torch.float64, generator=g) / INTER ** 0.5
    return a, b


def _experts(x, counts, a, b):
    """Expert-major rows -> SwiGLU outputs (gate | up in a's last dim), one expert at a time."""
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):               # a test: host syncs are fine here
        rows = x[start:start + n]
        gate, up = (rows @ a[e]).chunk(2, dim=-1)
        out.append((F.silu(gate) * up) @ b[e])
        start += n
    return torch.cat(out) if out else x[:0]


def _shard(a, b, ep_rank, ep, etp_rank, etp):
    """This rank's experts and I/etp slice, like megamoe.parallel.expert.shard_experts."""
    el, il = a.shape[0] // ep, INTER // etp
    e0, i0 = ep_rank * el, etp_rank * il
    a_loc = torch.cat([a[e0:e0 + el, :, i0:i0 + il], a[e0:e0 + el, :, INTER + i0:INTER + i0 + il]], dim=-1)
    b_loc = b[e0:e0 + el, i0:i0 + il]
    return a_loc.clone().requires_grad_(True), b_loc.clone().requires_grad_(True)


def _dispatcher_worker(rank, world, ep, etp, top_k, num_experts):
    import torch.distributed as dist

    from megamoe.parallel.expert import AllToAllDispatcher
    from megamoe.parallel.mesh import ParallelMesh, make_layout

    mesh = ParallelMesh(make_layout(world, ep=ep, etp=etp), rank)
    assert mesh.ep == ep and mesh.etp == etp
    ep_rank, etp_rank = mesh.rank_in("ep"), mesh.rank_in("etp")
    g = torch.Generator().manual_seed(rank)
    x0 = torch.randn(T, HID, dtype=torch.float64, generator=g)
    w0 = torch.rand(T, top_k, dtype=torch.float64, generator=g)
    grad_y = torch.randn(T, HID, dtype=torch.float64, generator=g)
    idx = _routing(rank, num_experts, ep, top_k)
    a_full, b_full = _expert_params(num_experts)

    runs = {}
    for dedup in (False, True):
        d = AllToAllDispatcher(num_experts, mesh.group("ep"), mesh.group("etp"), dedup=dedup)
        d.byte_counter = {}
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        a, b = _shard(a_full, b_full, ep_rank, ep, etp_rank, etp)
        x_local, counts_local, ctx = d.dispatch(x, idx)
        y = d.combine(_experts(x_local, counts_local, a, b), w, ctx)
        (y * grad_y).sum().backward()
        runs[dedup] = dict(x_local=x_local.detach(), counts=counts_local, y=y.detach(), gx=x.grad,
                           gw=w.grad, ga=a.grad, gb=b.grad, bytes=dict(d.byte_counter))

    # single-process reference on this rank's tokens with every expert's full parameters
    x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
    a, b = a_full.clone().requires_grad_(True), b_full.clone().requires_grad_(True)
    y = torch.zeros_like(x)
    for k in range(top_k):
        for t in range(T):
            e = int(idx[t, k])
            if e >= 0:
                gate, up = (x[t] @ a[e]).chunk(2, dim=-1)
                y = y.index_add(0, torch.tensor([t]), (w[t, k] * ((F.silu(gate) * up) @ b[e])).view(1, -1))
    (y * grad_y).sum().backward()
    ga_ref, gb_ref = a.grad.clone(), b.grad.clone()
    dist.all_reduce(ga_ref)          # edp == 1 here: a shard's gradient covers every rank's tokens
    dist.all_reduce(gb_ref)
    ga_ref, gb_ref = _shard(ga_ref, gb_ref, ep_rank, ep, etp_rank, etp)

    old, new = runs[False], runs[True]
    err = lambda p, q: (p - q).abs().max().item() if p.numel() else 0.0  # noqa: E731
    report = {
        "x_local_identical": torch.equal(old["x_local"], new["x_local"]),
        "counts_identical": torch.equal(old["counts"], new["counts"]),
        "vs_per_expert": {k: err(old[k], new[k]) for k in ("y", "gx", "gw", "ga", "gb")},
        "vs_reference": {"y": err(new["y"], y.detach()), "gx": err(new["gx"], x.grad),
                         "gw": err(new["gw"], w.grad), "ga": err(new["ga"], ga_ref),
                         "gb": err(new["gb"], gb_ref)},
        "per_expert_vs_reference": {"y": err(old["y"], y.detach()), "gw": err(old["gw"], w.grad)},
        "dropped_weight_grads_zero": bool((new["gw"][idx < 0] == 0).all()),
        "dispatch_bytes": (old["bytes"].get("dispatch.fwd", 0), new["bytes"].get("dispatch.fwd", 0)),
    }
    # expected off-rank pairs of this rank (rows sent by the dedup dispatch)
    el = num_experts // ep
    dest = torch.where(idx >= 0, idx // el, -1)
    pairs = sum(int(((dest == r).any(dim=1)).sum()) for r in range(ep) if r != ep_rank)
    report["expected_dispatch_bytes"] = pairs * HID * 8
    everyone = [None] * world
    dist.all_gather_object(everyone, report)
    return everyone


DISPATCH_CASES = {
    "ep2_top2": (2, 2, 1, 2, 8),
    "ep2_top4": (2, 2, 1, 4, 8),
    "ep4_top2": (4, 4, 1, 2, 16),
    "ep4_top4": (4, 4, 1, 4, 16),
    "etp2_top2": (2, 1, 2, 2, 8),
    "ep2xetp2_top4": (4, 2, 2, 4, 16),
}


@pytest.mark.parametrize("case", list(DISPATCH_CASES))
def test_dedup_dispatch_matches_per_expert_and_reference(case):
    world, ep, etp, top_k, num_experts = DISPATCH_CASES[case]
    reports = H.spawn(world, _dispatcher_worker, ep, etp, top_k, num_experts)
    assert reports is not None and len(reports) == world
    for rank, rep in enumerate(reports):
        assert rep["x_local_identical"] and rep["counts_identical"], (case, rank)
        for what, e in rep["vs_per_expert"].items():
            assert e < TOL, f"{case} rank {rank}: {what} differs from the per-expert path by {e}"
        for what, e in rep["vs_reference"].items():
            assert e < TOL, f"{case} rank {rank}: {what} differs from one process by {e}"
        for what, e in rep["per_expert_vs_reference"].items():
            assert e < TOL, f"{case} rank {rank}: per-expert {what} differs from one process by {e}"
        assert rep["dropped_weight_grads_zero"], (case, rank)
        if ep > 1:
            per_expert, dedup = rep["dispatch_bytes"]
            assert dedup == rep["expected_dispatch_bytes"] <= per_expert, (case, rank, rep["dispatch_bytes"])
    if ep > 1:   # the forced same-rank tokens make the saving certain
        assert sum(r["dispatch_bytes"][1] for r in reports) < sum(r["dispatch_bytes"][0] for r in reports)


# ------------------------------------------------------------------------------------- bf16

def _bf16_worker(rank, world, ep, top_k, num_experts):
    from megamoe.parallel.expert import AllToAllDispatcher
    from megamoe.parallel.mesh import ParallelMesh, make_layout

    mesh = ParallelMesh(make_layout(world, ep=ep), rank)
    g = torch.Generator().manual_seed(rank)
    x0 = torch.randn(T, HID, generator=g).to(torch.bfloat16)
    w0 = torch.rand(T, top_k, generator=g)                      # fp32 router weights
    grad_y = torch.randn(T, HID, generator=g).to(torch.bfloat16)
    idx = _routing(rank, num_experts, ep, top_k)
    a_full, b_full = _expert_params(num_experts)
    out = {}
    for name, kw in (("per_expert", dict(dedup=False)), ("dedup", dict()),
                     ("dedup_low", dict(low_precision_partials=True))):
        d = AllToAllDispatcher(num_experts, mesh.group("ep"), **kw)
        d.byte_counter = {}
        x, w = x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        a, b = (t.to(torch.bfloat16) for t in _shard(a_full, b_full, mesh.rank_in("ep"), ep, 0, 1))
        x_local, counts, ctx = d.dispatch(x, idx)
        y = d.combine(_experts(x_local, counts, a, b), w, ctx)
        (y.float() * grad_y.float()).sum().backward()
        out[name] = (y.detach().float(), x.grad.float(), w.grad, dict(d.byte_counter), y.dtype)
    ref = out["per_expert"]
    rep = {}
    for name in ("dedup", "dedup_low"):
        y, gx, gw, nbytes, dtype = out[name]
        ulp = 2.0 ** -7 * ref[0].abs().clamp(min=1e-3)          # one bf16 ulp (8 bits)
        rep[name] = {"dtype": str(dtype), "y_within_ulp": bool(((y - ref[0]).abs() <= ulp).all()),
                     "y_equal_frac": (y == ref[0]).float().mean().item(),
                     "y_rel_to_max": ((y - ref[0]).abs().max() / ref[0].abs().max()).item(),
                     "gx": (gx - ref[1]).abs().max().item(), "gw": (gw - ref[2]).abs().max().item(),
                     "bytes": nbytes}
    return rep


def test_dedup_in_bf16_sums_partials_in_fp32():
    """bf16 data: the per-(token, rank) partial sums travel in fp32 (only the combine forward),
    so the output is rounded once, as in one process: equal to the per-expert path but for fp32
    summation order (at most one bf16 ulp, almost always identical). Gradients travel in bf16.
    low_precision_partials=True ships the partials in bf16 (one more rounding each)."""
    rep = H.spawn(2, _bf16_worker, 2, 4, 8)
    exact, low = rep["dedup"], rep["dedup_low"]
    assert exact["dtype"] == low["dtype"] == "torch.bfloat16"
    assert exact["y_within_ulp"] and exact["y_equal_frac"] > 0.98, exact
    assert low["y_rel_to_max"] <= 2.0 ** -7, low         # extra roundings: a few ulps at most
    for r in (exact, low):
        assert r["gx"] < 2e-2 and r["gw"] < 1e-2, r
    b = exact["bytes"]
    # rows are H bf16 values (2 B) except the fp32 partials of the combine forward (4 B); a rank
    # sends back (combine.fwd, dispatch.bwd) the pairs it received
    assert b["combine.fwd"] == 2 * b["dispatch.bwd"] > 0 and b["combine.bwd"] == b["dispatch.fwd"] > 0
    assert low["bytes"]["combine.fwd"] == low["bytes"]["dispatch.bwd"]


# ---------------------------------------------------------------------------------- model level

def _model_worker(rank, world, top_k, parallel):
    cfg = H.tiny_cfg()
    cfg.model.moe.top_k = top_k
    model, loss_fn, moes, data = H.parallel_model_step_inputs(cfg, rank, world, parallel)
    assert moes and all(hasattr(m.dispatcher, "dedup") for m in moes)
    out = {}
    for dedup in (False, True):
        for m in moes:
            m.dispatcher.dedup = dedup
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(data[:, :-1]), data[:, 1:])
        loss.backward()
        out[dedup] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                    if p.grad is not None})
    (l0, g0), (l1, g1) = out[False], out[True]
    assert set(g0) == set(g1)
    return {"loss": abs(l0 - l1), "grads": max((g0[n] - g1[n]).abs().max().item() for n in g0),
            "num_grads": len(g0), "expert_grads": sum("experts" in n for n in g0)}


@pytest.mark.parametrize("top_k", [2, 4])
def test_dedup_under_tp2xep2_sp_matches_per_expert(top_k):
    res = H.spawn(2, _model_worker, top_k, dict(tp=2, ep=2, sequence_parallel=True))
    assert res["expert_grads"] > 0 and res["num_grads"] > res["expert_grads"]
    assert res["loss"] < TOL and res["grads"] < TOL, res
