"""Data-parallel gradient reduction overlapped with backward (real gloo processes, fp64).

Instrumented, never timed: every parameter gets a counting post-accumulate-grad hook that runs
before the reducer's own, and each bucket launch is recorded with the phase it happened in (the
context's no_sync calls say which backward runs), how many gradient accumulations had happened
by then, and the bucket's gradients at that moment. Each test runs the same step twice, with
overlap off (everything reduced in reduce_grads) and on. Checked:
  - plain DP (MicroBatchLoop, 4 micro-batches, small buckets, one parameter outside the graph):
    nothing is launched in the first three micro-batches' backwards; at least one bucket is
    launched during the last backward, before it finished; an early bucket's gradients had all
    their accumulations and equal the finished backward's; buckets launch in bucket order; the
    rest (the unused parameter's bucket included) launch in reduce_grads, and the unused
    parameter's gradient is zero. The reduced gradients equal, exactly, those without overlap,
    which equal a per-parameter all-reduce of the accumulated gradients.
  - pipeline (PP2 x DP2, 1F1B, tied embeddings): the same, each chunk armed when its last
    backward starts; the tied weight (summed across the stages in reduce_grads) is reduced
    only in reduce_grads, after that sum.
  - ZeRO-1 (DP2, the same 4 micro-batches and small buckets): the bucketed reduce-scatters
    launch during the last backward under the same rules, and every bucket's owned slice
    equals, exactly, the non-overlapped reduction and a per-parameter all-reduce / dp; the
    parameter all-gather after the step runs in several chunks with more than one collective
    in flight, and gives exactly the one-shot all-gather's parameters.
"""

import os

import torch
import torch.distributed as dist

import parallel_harness as H

NUM_MICRO = 4
BUCKET_NUMEL = 3000


def _cfg(out_dir, **parallel):
    cfg = H.tiny_cfg(out_dir, "fp64", **parallel)
    cfg.global_batch_size = cfg.micro_batch_size * NUM_MICRO * 2     # DP 2 in every test
    return cfg


def _trainer(cfg, zero1=False, bucket_numel=BUCKET_NUMEL, unused_param=False):
    """(trainer, accumulation counts by param id): the build_training pipeline by hand, so that
    the counting hooks come first and the buckets are small."""
    from megamoe.model.transformer import build_model
    from megamoe.parallel import setup as par
    from megamoe.parallel.context import ParallelContext
    from megamoe.training.build import TrainingRun, resolve_backends
    from megamoe.training.context import MicroBatchLoop, cross_entropy
    from megamoe.training.trainer import Trainer

    setup = par.build_mesh(cfg, verbose=False)
    model = build_model(cfg.model, seed=cfg.seed)
    chunk_layers, loss_fn = par.apply_model_parallel(model, setup, cfg)
    if unused_param and "0" in model.layers:      # in no graph: never gets a gradient
        model.layers["0"].register_parameter("unused", torch.nn.Parameter(torch.ones(5)))
    model.to(torch.float64)
    pipeline = par.build_pipeline(model, setup, chunk_layers, cfg, torch.float64)
    counts = {}
    for p in model.parameters():
        counts[id(p)] = 0
        p.register_post_accumulate_grad_hook(lambda p: counts.__setitem__(id(p), counts[id(p)] + 1))
    optimizer, grads = par.build_data_parallel(model, setup.mesh, cfg.optim, zero1, bucket_numel=bucket_numel)
    ctx = ParallelContext(setup.mesh, grads, loss_fn or cross_entropy, pipeline or MicroBatchLoop(),
                          zero1=zero1, pipeline=pipeline)
    run = TrainingRun(cfg, model, optimizer, ctx, torch.device("cpu"), resolve_backends(cfg, torch.device("cpu")))
    return Trainer(run, H.synthetic_ds()), counts


def _batches(trainer, step=0):
    from megamoe.data.sampler import rank_micro_batches
    cfg = trainer.cfg
    ids = rank_micro_batches(step, cfg.global_batch_size, cfg.micro_batch_size, trainer.dp_rank, trainer.dp_size)
    return [trainer.get_batch(trainer.train_ds, i) for i in ids]


def _instrumented_step(trainer, counts, overlap: bool):
    """forward_backward + reduce_grads of step 0 with every launch recorded (phase, number of
    accumulations so far, the bucket's gradients at that moment); returns (launch records,
    local gradients before reduce_grads (meaningful without overlap: a one-parameter bucket
    is reduced in place in .grad once launched), final accumulation counts, reduced grads)."""
    reducer, ctx = trainer.ctx.grads, trainer.ctx
    reducer.overlap = overlap
    phase = {"now": "forward_backward"}
    launches = []
    for i, b in enumerate(reducer.buckets):
        def launch(b=b, i=i, real=b.launch):
            launches.append({"bucket": i, "phase": phase["now"], "fired": sum(counts.values()),
                             "counts": [counts[id(p)] for p in b.params], "late": b.deferred,
                             "grads": [None if p.grad is None else p.grad.clone() for p in b.params]})
            real()
        b.launch = launch
    real_no_sync = ctx.no_sync

    def no_sync(model, last):       # which backward is running (the pipeline calls it too)
        phase["now"] = "last backward" if last else "earlier backward"
        return real_no_sync(model, last)
    ctx.no_sync = no_sync
    for k in counts:
        counts[k] = 0
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.model.set_aux_loss_scale(1.0 / trainer.num_micro)
    trainer.forward_backward(_batches(trainer))
    phase["now"] = "reduce_grads"
    local = {id(p): p.grad.detach().clone() for p in trainer.model.parameters() if p.grad is not None}
    ctx.reduce_grads(trainer.model)
    ctx.no_sync = real_no_sync
    for b in reducer.buckets:
        del b.launch
    return launches, local, dict(counts), {id(p): p.grad.clone() for p in trainer.model.parameters()}


def _manual_reduction(trainer, local):
    """The non-overlapped reduction, one parameter at a time: (tied sum,) sum over the reduce
    group, / dp; zeros for a parameter without a gradient."""
    from megamoe.parallel.params import get_spec
    mesh, runner = trainer.ctx.mesh, trainer.ctx.pipeline
    out = {}
    for p in trainer.model.parameters():
        g = local.get(id(p), torch.zeros_like(p)).clone()
        if runner is not None and p is runner.tied_weight:
            dist.all_reduce(g, group=mesh.group("embed"))
        name = get_spec(p).reduce_group
        if mesh.size(name) > 1:
            dist.all_reduce(g, group=mesh.group(name))
        out[id(p)] = g / mesh.dp
    return out


def _assert_equal(got, expected):
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), f"a {tuple(got[k].shape)} gradient differs"


def _zero_shards_equal(trainer, local):
    """ZeRO-1 after reduce_grads: each bucket's owned slice holds the manual reduction (the rest
    of the flat buffer keeps this rank's local gradients)."""
    manual = _manual_reduction(trainer, local)
    for b in trainer.optimizer.buckets:
        ref = torch.cat([manual[id(p)].reshape(-1) for p in b.params])
        ref = torch.cat([ref, ref.new_zeros(b.grad_buf.numel() - ref.numel())])
        assert torch.equal(b.grad_buf[b.lo:b.hi], ref[b.lo:b.hi]), b.names


def _overlap_vs_plain(trainer, counts):
    """The same step without and with overlap; what every rank asserts (summary for rank 0)."""
    reducer = trainer.ctx.grads
    plain, local, _, reduced_plain = _instrumented_step(trainer, counts, overlap=False)
    assert all(l["phase"] == "reduce_grads" for l in plain)
    if trainer.ctx.zero1:                                              # the reference is right
        _zero_shards_equal(trainer, local)
    else:
        _assert_equal(reduced_plain, _manual_reduction(trainer, local))
    launches, _, final, reduced = _instrumented_step(trainer, counts, overlap=True)
    _assert_equal(reduced, reduced_plain)                             # overlap changes nothing
    total = sum(final.values())
    assert [l["bucket"] for l in launches] == list(range(len(reducer.buckets))), "launch order"
    early = [l for l in launches if l["phase"] != "reduce_grads"]
    # Overlap: some all-reduce started while backward still had gradients to accumulate.
    assert any(l["fired"] < total for l in early), launches
    assert len(early) < len(launches)        # the unused / late buckets wait for reduce_grads
    for l, b in zip(launches, reducer.buckets):
        if l["phase"] == "reduce_grads":
            continue
        assert not l["late"] and l["phase"] == "last backward", l["phase"]
        # launched only once every gradient of the bucket was final: all NUM_MICRO
        # accumulations done, and the values those of the finished backward
        assert l["counts"] == [final[id(p)] for p in b.params] and set(l["counts"]) == {NUM_MICRO}
        for p, g in zip(b.params, l["grads"]):
            assert torch.equal(g, local[id(p)])
    return {"buckets": len(launches), "early": len(early),
            "during_backward": sum(l["fired"] < total for l in early)}, launches


def dp_worker(rank, world_size, out_root):
    cfg = _cfg(os.path.join(out_root, "dp2"))
    trainer, counts = _trainer(cfg, unused_param=True)
    assert len(trainer.ctx.grads.buckets) > 3
    summary, launches = _overlap_vs_plain(trainer, counts)
    unused = trainer.model.layers["0"].unused
    assert counts[id(unused)] == 0 and torch.equal(unused.grad, torch.zeros(5, dtype=torch.float64))
    # A second overlapped step on the same reducer: its state was reset by reduce_grads.
    again, _, _, _ = _instrumented_step(trainer, counts, overlap=True)
    assert [(l["bucket"], l["phase"]) for l in again] == [(l["bucket"], l["phase"]) for l in launches]
    return summary


def pp_worker(rank, world_size, out_root):
    cfg = _cfg(os.path.join(out_root, "pp2xdp2"), pp=2)
    cfg.model.num_layers, cfg.model.tie_embeddings = 4, True
    trainer, counts = _trainer(cfg, unused_param=True)
    reducer, runner = trainer.ctx.grads, trainer.ctx.pipeline
    assert runner is not None and runner.tied_weight is not None and trainer.dp_size == 2
    summary, launches = _overlap_vs_plain(trainer, counts)
    tied = [l for l, b in zip(launches, reducer.buckets) if any(p is runner.tied_weight for p in b.params)]
    assert len(tied) == 1 and tied[0]["late"] and tied[0]["phase"] == "reduce_grads"
    everything = [None] * world_size
    dist.all_gather_object(everything, summary)
    return everything


def zero_worker(rank, world_size, out_root):
    from megamoe.parallel import collectives as C
    cfg = _cfg(os.path.join(out_root, "dp2_zero1"))
    trainer, _ = _trainer(cfg, zero1=True, bucket_numel=BUCKET_NUMEL)
    opt = trainer.optimizer
    real, stats = C._all_gather_flat, {"calls": 0, "outstanding": 0, "max_outstanding": 0}

    class Work:
        def __init__(self, work):
            self.work = work

        def wait(self):
            stats["outstanding"] -= 1
            return self.work.wait()

    def counting(out, inp, group=None, async_op=False):
        stats["calls"] += 1
        stats["outstanding"] += 1
        stats["max_outstanding"] = max(stats["max_outstanding"], stats["outstanding"])
        return Work(real(out, inp, group=group, async_op=async_op))
    C._all_gather_flat = counting
    try:
        trainer.train_step()
    finally:
        C._all_gather_flat = real
    assert stats["outstanding"] == 0 and stats["max_outstanding"] >= 2
    assert stats["calls"] > len(opt.buckets)
    for b in opt.buckets:                      # the one-shot all-gather of the whole buffer
        full = torch.empty_like(b.param_buf)
        dist.all_gather_into_tensor(full, b.param_buf[b.lo:b.hi].clone(), group=b.group)
        assert torch.equal(full, b.param_buf)
        assert torch.equal(b.param_buf[b.lo:b.hi], b.master.detach())
    return dict(stats)


def zero_overlap_worker(rank, world_size, out_root):
    """ZeRO-1: bucketed reduce-scatters launched during the last backward, same result."""
    cfg = _cfg(os.path.join(out_root, "dp2_zero1_overlap"))
    trainer, counts = _trainer(cfg, zero1=True, unused_param=True)
    assert len(trainer.optimizer.buckets) > 3
    summary, _ = _overlap_vs_plain(trainer, counts)
    return summary


def both_dp_workers(rank, world_size, out_root):
    return (dp_worker(rank, world_size, out_root), zero_worker(rank, world_size, out_root),
            zero_overlap_worker(rank, world_size, out_root))


def test_dp_overlap_and_zero1_overlap_and_chunked_all_gather(tmp_path):
    dp, zero, zero_overlap = H.spawn(2, both_dp_workers, str(tmp_path))
    assert dp["early"] >= 1 and dp["during_backward"] >= 1
    assert zero_overlap["early"] >= 1 and zero_overlap["during_backward"] >= 1
    assert zero["max_outstanding"] >= 2


def test_pipeline_overlap_with_tied_embeddings(tmp_path):
    summaries = H.spawn(4, pp_worker, str(tmp_path))
    assert all(s["during_backward"] >= 1 for s in summaries)
