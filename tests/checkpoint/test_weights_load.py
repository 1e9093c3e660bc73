"""The model-only sharded checkpoint (what from-hf writes) loads into a TP2 x EP2 x PP2 layout
(4 gloo processes, CPU) through the trainer's resume (Trainer.resume -> sharded.load): every rank gets exactly its slices
of the full model, and reads only those (counted at the file reader)."""

import os

import torch

from megamoe.checkpoint import reshard
from megamoe.checkpoint.resolve import newest_checkpoint
from megamoe.config import preset
from megamoe.hf.io import write_megamoe
from megamoe.model.transformer import build_model
from megamoe.parallel.params import full_index


def _cfg(out_dir: str, **parallel):
    cfg = preset("tiny")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 64, 32, 2, 4, 2
    m.ffn_hidden, m.seq_length, m.qk_norm = 64, 16, True
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden, m.moe.first_k_dense = 8, 2, 16, 0
    cfg.dtype, cfg.out_dir, cfg.resume, cfg.progress = "fp32", out_dir, False, False
    cfg.micro_batch_size, cfg.global_batch_size = 2, 2
    cfg.eval_interval, cfg.save_interval, cfg.log_interval = 0, 0, 0
    cfg.tensorboard, cfg.watchdog_s = False, 0
    for k, v in parallel.items():
        setattr(cfg.parallel, k, v)
    return cfg


def _load_worker(rank, world_size, ckpt_dir, full_path):
    import torch.distributed as dist

    from megamoe.checkpoint import sharded, stfiles
    from megamoe.parallel.params import get_spec
    from megamoe.training.build import build_training
    from megamoe.training.trainer import Trainer

    reads = []
    plain_read = stfiles.SafetensorsFile.read

    def counted(self, name, rows=None):
        t = plain_read(self, name, rows)
        reads.append((name, t.numel() * t.element_size()))
        return t

    stfiles.SafetensorsFile.read = counted
    cfg = _cfg(os.path.dirname(os.path.dirname(ckpt_dir)), tp=2, ep=2, pp=2)
    cfg.resume = True
    run = build_training(cfg, verbose=False)
    trainer = Trainer(run, [torch.arange(17) % 64 for _ in range(4)])
    trainer.resume()                 # the newest complete checkpoint: the converted one
    assert trainer.step == 0
    full = torch.load(full_path, weights_only=True)
    wrong, mine, slice_bytes = [], set(), {}
    for name, p, names in sharded.local_params(run.model):
        spec = get_spec(p)
        want = reshard.assemble([(full_index(full[name].shape), None, full[name])], spec.index, None, name)
        if not torch.equal(p.detach(), want.to(p.dtype)):
            wrong.append(name)
        mine.update(names)
        slice_bytes[name] = want.numel() * want.element_size()
    for name, b in sharded.local_buffers(run.model):
        mine.add(name)
        if not torch.equal(b, full[name].to(b.dtype)):
            wrong.append(name)
    per_name = {}
    for name, n in reads:
        per_name[name] = per_name.get(name, 0) + n
    report = {"wrong": wrong, "mine": mine, "read": per_name, "slice_bytes": slice_bytes,
              "largest": max(n for _, n in reads)}
    everyone = [None] * world_size
    dist.all_gather_object(everyone, report)
    return everyone


def test_weights_checkpoint_loads_into_tp2_ep2_pp2(tmp_path):
    from megamoe.parallel.spawn import spawn

    torch.manual_seed(0)
    cfg = _cfg(str(tmp_path / "conv"))
    model = build_model(cfg.model, seed=3)
    full = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}  # bf16 kept
    write_megamoe(str(tmp_path / "conv"), cfg.model, full, max_shard_size="20KB")
    ckpt_dir = newest_checkpoint(str(tmp_path / "conv"))
    assert sum(f.endswith(".safetensors") for f in os.listdir(ckpt_dir)) > 2
    torch.save(full, str(tmp_path / "full.pt"))

    reports = spawn(4, _load_worker, ckpt_dir, str(tmp_path / "full.pt"))
    total = sum(t.numel() * t.element_size() for t in full.values())
    largest_tensor = max(t.numel() * t.element_size() for t in full.values())
    for rank, r in enumerate(reports):
        assert r["wrong"] == [], (rank, r["wrong"])
        # Only tensors this rank holds are read (a pipeline stage never opens the other's layers)...
        assert set(r["read"]) <= r["mine"], (rank, set(r["read"]) - r["mine"])
        # ... expert-parallel tensors only as the rows of its own experts ...
        experts = [n for n in r["read"] if ".experts." in n]
        assert experts and all(r["read"][n] == r["slice_bytes"][n] for n in experts), (rank, {n: (r["read"][n], r["slice_bytes"][n]) for n in experts})
        for n in experts:
            assert r["slice_bytes"][n] * 2 == full[n].numel() * full[n].element_size()
        # ... never more than one tensor at a time, and well under the model in all.
        assert r["largest"] <= largest_tensor
        assert sum(r["read"].values()) < total / 2, rank
