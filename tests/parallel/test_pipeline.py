"""Pipeline schedules and execution (real gloo processes) against a single-process run."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from megamoe.config import ModelConfig, MoEConfig
from megamoe.model.transformer import build_model
from megamoe.parallel.pipeline import PipelineExecutor, apply_pp, partition_layers, schedule, stage_chunks

VOCAB, SEQ, MB, NUM_MICRO = 64, 8, 2, 4


def model_cfg(layers, tie=False):
    return ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=layers, num_heads=4, ffn_hidden=64,
                       seq_length=SEQ, tie_embeddings=tie,
                       moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, moe_layer_freq=2))


def data():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (NUM_MICRO, MB, SEQ + 1), generator=g)
    return tokens[..., :-1], tokens[..., 1:]


def ce(logits, labels):
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))


def test_partition_even_uneven_and_errors():
    assert partition_layers(5, 2) == [[0, 1, 2], [3, 4]]
    assert partition_layers(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert partition_layers(8, 2, layout="3,5") == [[0, 1, 2], [3, 4, 5, 6, 7]]
    with pytest.raises(ValueError, match="must add up to model.num_layers"):
        partition_layers(8, 2, layout="3,4")
    with pytest.raises(ValueError, match="smaller than pp"):
        partition_layers(2, 4)


@pytest.mark.parametrize("pp, vpp, m", [(2, 1, 4), (4, 1, 3), (4, 2, 8), (2, 3, 4)])
def test_schedule_runs_every_op_once_in_dependency_order(pp, vpp, m):
    for r in range(pp):
        ops = schedule(pp, vpp, m, r)
        fwd = [(o.micro, o.chunk) for o in ops if o.kind == "F"]
        bwd = [(o.micro, o.chunk) for o in ops if o.kind == "B"]
        assert sorted(fwd) == sorted(bwd) == sorted((i, c) for i in range(m) for c in range(vpp))
        for i, o in enumerate(ops):
            if o.kind == "B":
                assert ops.index(type(o)("F", o.micro, o.chunk)) < i


def _worker(rank, world, vpp, layers, tie, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    cfg = model_cfg(layers, tie)
    model = build_model(cfg, seed=0)
    chunk_layers = apply_pp(model, rank, world, vpp)
    chunks = stage_chunks(model, chunk_layers, rank, world)
    model.train()
    model.set_aux_loss_scale(1.0 / NUM_MICRO)
    inputs, labels = data()
    ex = PipelineExecutor(chunks, rank, world, None, list(range(world)), (MB, SEQ, 32))
    losses = ex.run(list(inputs), list(labels), ce, NUM_MICRO, torch.device("cpu"))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if tie:  # tied embedding: stage 0's embedding and the last stage's head sum their grads
        emb = grads.get("embed.weight", torch.zeros(VOCAB, 32))
        head = grads.get("lm_head.weight", torch.zeros(VOCAB, 32))
        total = emb + head
        dist.all_reduce(total)
        for k in ("embed.weight", "lm_head.weight"):
            if k in grads:
                grads[k] = total
    torch.save({"losses": losses, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world, vpp, layers, tie", [(2, 1, 4, False), (2, 2, 4, True), (4, 2, 8, False)])
def test_pipeline_matches_single_process(tmp_path, world, vpp, layers, tie):
    mp.spawn(_worker, args=(world, vpp, layers, tie, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    ref = build_model(model_cfg(layers, tie), seed=0)
    ref.train()
    ref.set_aux_loss_scale(1.0 / NUM_MICRO)
    inputs, labels = data()
    ref_losses = []
    for m in range(NUM_MICRO):
        loss = ce(ref(inputs[m]), labels[m])
        (loss / NUM_MICRO).backward()
        ref_losses.append(loss.detach())
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    last_rank = world - 1  # the last stage lives on the last pipeline rank
    torch.testing.assert_close(torch.stack(results[last_rank]["losses"]), torch.stack(ref_losses),
                               atol=1e-5, rtol=1e-5)
    seen = set()
    for res in results:
        for name, g in res["grads"].items():
            ref_p = ref.get_parameter(name) if name != "lm_head.weight" or not tie else ref.lm_head.weight
            torch.testing.assert_close(g, ref_p.grad, atol=1e-5, rtol=1e-4, msg=name)
            seen.add(name)
    assert seen == {n for n, _ in ref.named_parameters()} | ({"lm_head.weight"} if tie else set())
