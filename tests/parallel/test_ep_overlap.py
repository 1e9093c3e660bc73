"""Overlapped expert-parallel exchanges (parallel.ep_overlap_chunks) against no overlap, in fp64.

Model level (real gloo processes): a tiny MoE with a gated shared expert, one forward/backward
per variant: token chunks 1, 2 and 3 (an uneven split) x no recompute, selective recompute and
full recompute. The loss and every parameter gradient equal the one-chunk, no-recompute run
within 1e-12 under EP2, EP4, TP2 x EP2 with sequence parallelism, and EP2 x ETP2. Chunks change
only where the expert weights' gradients are summed (per chunk, then added: ~1e-16 per
operation); recompute changes nothing (the same ops run again).

Schedule: the order of exchange starts, waits and expert work inside one MoE layer's forward,
recorded from the collectives themselves: with two chunks both dispatches start before any
expert GEMM, the shared experts run while they travel, chunk 0's combine is in flight while
chunk 1's experts run, and there is still one device-to-host transfer for the layer.
"""

import pytest
import torch

import parallel_harness as H

TOL = 1e-12
VARIANTS = [(chunks, recompute) for chunks in (1, 2, 3) for recompute in (None, "selective", "full")]


def _model_worker(rank, world, parallel):
    cfg = H.tiny_cfg()
    cfg.model.moe.num_shared_experts, cfg.model.moe.shared_expert_gate = 1, True
    model, loss_fn, moes, data = H.parallel_model_step_inputs(cfg, rank, world, parallel)
    assert moes and all(m.shared_experts is not None and hasattr(m.dispatcher, "chunks") for m in moes)
    out = {}
    for chunks, recompute in VARIANTS:
        for m in moes:
            m.dispatcher.chunks = chunks
        model.set_activation_checkpointing(recompute is not None, selective=recompute == "selective")
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(data[:, :-1]), data[:, 1:])
        loss.backward()
        out[chunks, recompute] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None})
    base_loss, base = out[1, None]
    diffs = {}
    for key, (loss, grads) in out.items():
        assert set(grads) == set(base), key
        diffs[f"{key[0]}/{key[1]}"] = max([abs(loss - base_loss)]
                                          + [(grads[n] - base[n]).abs().max().item() for n in base])
    return {"diffs": diffs, "expert_grads": sum("experts" in n for n in base), "num_grads": len(base)}


CASES = {
    "ep2": (2, dict(ep=2)),
    "ep4": (4, dict(ep=4)),
    "tp2xep2_sp": (2, dict(tp=2, ep=2, sequence_parallel=True)),
    "ep2xetp2": (4, dict(ep=2, etp=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_overlap_chunks_and_recompute_equal_no_overlap(case):
    world, parallel = CASES[case]
    res = H.spawn(world, _model_worker, dict(parallel))
    assert res["expert_grads"] > 0 and res["num_grads"] > res["expert_grads"]
    assert set(res["diffs"]) == {f"{c}/{r}" for c, r in VARIANTS}
    for variant, err in res["diffs"].items():
        assert err < TOL, f"{case} {variant}: differs from one chunk without recompute by {err}"


# --------------------------------------------------------------------------------- schedule

def _schedule_worker(rank, world, chunks):
    from megamoe.moe.layer import MoELayer
    from megamoe.parallel import collectives as C
    from megamoe.parallel import expert as X
    from megamoe.parallel.mesh import ParallelMesh, make_layout
    from megamoe.parallel.parallelize import apply_ep

    cfg = H.tiny_cfg()
    cfg.model.moe.num_shared_experts = 1
    torch.manual_seed(0)
    layer = MoELayer(cfg.model.d_model, cfg.model.moe).double()

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = layer

    mesh = ParallelMesh(make_layout(world, ep=world), rank)
    apply_ep(Holder(), mesh, overlap_chunks=chunks)
    events = []
    start, wait, host = C._Flight.start, C._Flight.wait, X.host_ints

    def logged_start(self, x, in_splits, out_splits, backward):
        events.append(("start", x.dtype.is_floating_point, backward))
        return start(self, x, in_splits, out_splits, backward)

    def logged_wait(self, work):
        events.append(("wait",))
        return wait(self, work)

    def logged_host(t):
        events.append(("host",))
        return host(t)

    C._Flight.start, C._Flight.wait, X.host_ints = logged_start, logged_wait, logged_host
    layer.experts.register_forward_hook(lambda *a: events.append(("experts",)))
    layer.shared_experts.register_forward_hook(lambda *a: events.append(("shared",)))
    x = torch.randn(16, cfg.model.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(rank),
                    requires_grad=True)
    layer.train()
    layer(x).sum().backward()
    return events


def _compact(events):
    """Forward events as a string: S row start, s id start, W wait, E experts, H shared, T host."""
    code = {"wait": "W", "experts": "E", "shared": "H", "host": "T"}
    out = []
    for e in events:
        if e[0] == "start":
            if e[2]:
                break                  # backward begins
            out.append("S" if e[1] else "s")
        else:
            out.append(code[e[0]])
    return "".join(out)


def test_two_chunk_schedule_overlaps_exchanges_with_expert_work():
    one = _compact(H.spawn(2, _schedule_worker, 1))
    two = _compact(H.spawn(2, _schedule_worker, 2))
    # one chunk: the host transfer, rows + ids start, the shared experts run while they travel,
    # wait, experts, combine starts (the weights' small exchange is synchronous), wait
    assert one == "TSsHWWESW", one
    # two chunks: ONE host transfer for both; both chunks' dispatches start before any expert
    # GEMM; chunk 0's combine (S) is in flight while chunk 1 is received and computed (WWE);
    # both combines waited at the end
    assert two == "TSsSsHWWESWWESWW", two


def test_async_backward_exchange_is_started_and_waited_once_per_differentiable_exchange():
    events = H.spawn(2, _schedule_worker, 2)
    fwd_rows = [e for e in events if e[0] == "start" and e[1] and not e[2]]
    bwd = [e for e in events if e[0] == "start" and e[2]]
    # every floating-point exchange (2 dispatch rows + 2 combine rows) sends its gradient back;
    # the integer ids have none
    assert len(fwd_rows) == 4 and len(bwd) == 4, events
    assert sum(e[0] == "wait" for e in events) == 6 + 4   # 4 rows + 2 ids forward, 4 backward
    assert sum(e[0] == "host" for e in events) == 1
