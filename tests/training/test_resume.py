"""Save -> kill -9 -> resume gives bit-identical next losses vs an uninterrupted run (CPU)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch

from megamoe.config import preset
from megamoe.model.transformer import build_model
from megamoe import checkpoint as ckpt
from megamoe.training.trainer import Trainer
from megamoe.training.build import build_training

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    from megamoe.config import preset
    from megamoe.training.build import build_training
    from megamoe.training.trainer import Trainer
    sys.path.insert(0, os.path.dirname(sys.argv[3]))
    from test_resume import tiny_cfg, synthetic_ds
    out_dir, kill_at, _ = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    cfg = tiny_cfg(out_dir)
    t = Trainer(build_training(cfg, verbose=False), synthetic_ds())
    def stop():  # called after the step's checkpoint is written
        if t.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return False
    hist = t.train(stop_requested=stop)
    print(json.dumps([h["loss"] for h in hist]))
""")


def tiny_cfg(out_dir):
    cfg = preset("tiny")
    cfg.model.num_layers, cfg.model.d_model, cfg.model.seq_length = 2, 64, 32
    cfg.model.moe.expert_hidden = 64
    cfg.steps, cfg.save_interval, cfg.eval_interval = 6, 3, 0
    cfg.micro_batch_size, cfg.global_batch_size = 2, 4
    cfg.optim.warmup_steps = 2
    cfg.out_dir, cfg.progress = out_dir, False
    return cfg


def synthetic_ds(n=64, seq=32, vocab=2048):
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, size=seq + 1) for _ in range(n)]


def run_script(out_dir, kill_at):
    return subprocess.run([sys.executable, "-c", SCRIPT, out_dir, str(kill_at), __file__],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_kill_and_resume_is_bit_identical(tmp_path):
    full = run_script(str(tmp_path / "full"), kill_at=-1)
    assert full.returncode == 0, full.stderr
    full_losses = json.loads(full.stdout.strip().splitlines()[-1])

    killed = run_script(str(tmp_path / "resumed"), kill_at=3)
    assert killed.returncode == -9  # really killed
    assert ckpt.newest_checkpoint(str(tmp_path / "resumed")).endswith("step_00000003")
    resumed = run_script(str(tmp_path / "resumed"), kill_at=-1)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == full_losses[3:]


def test_checkpoint_has_everything_and_loads_weights_only(tmp_path):
    cfg = tiny_cfg(str(tmp_path))
    cfg.steps = 2
    t = Trainer(build_training(cfg, build_model(cfg.model, seed=0), device=torch.device("cpu"), verbose=False), synthetic_ds())
    t.train()
    latest = ckpt.newest_checkpoint(str(tmp_path))
    assert sorted(os.listdir(latest)) == ["COMPLETE", "config.yaml", "model.pt", "optimizer.pt", "trainer.pt"]
    state = torch.load(os.path.join(latest, "trainer.pt"), weights_only=True)
    assert state["step"] == 2 and state["consumed_samples"] == 8


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    ckpt.save_checkpoint(str(tmp_path), 1, {"model.pt": {"w": torch.ones(2)}})
    # a crashed writer leaves only a hidden temp dir behind
    os.makedirs(tmp_path / "checkpoints" / ".step_00000002.tmp-123")
    latest = ckpt.newest_checkpoint(str(tmp_path))
    assert latest.endswith("step_00000001")
    assert ckpt.list_checkpoints(str(tmp_path)) == ["step_00000001"]


def test_nan_guard_skips_then_stops(tmp_path):
    import pytest
    from megamoe.training.trainer import TrainingError
    cfg = tiny_cfg(str(tmp_path))
    cfg.max_bad_steps = 2
    model = build_model(cfg.model, seed=0)
    t = Trainer(build_training(cfg, model, device=torch.device("cpu"), verbose=False), synthetic_ds())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    rec = t.train_step()
    assert rec["skipped"]
    for k, v in model.state_dict().items():
        if k != "lm_head.weight":
            assert torch.equal(v, before[k]), k  # no update applied
    with pytest.raises(TrainingError, match="2 non-finite steps in a row"):
        t.train_step()
