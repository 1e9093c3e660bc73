"""Resume safety: newest complete checkpoint whatever `latest` says, one-line errors for corrupt,
truncated or mismatched checkpoints (single-process and sharded, trainer and converter), and a
timed-out expert-parallel count exchange that names its group."""

import os
import subprocess
import sys
import time

import pytest
import torch

from megamoe.checkpoint import CheckpointError, files, resolve
from megamoe.training.build import build_training
from megamoe.training.trainer import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parallel"))
import parallel_harness as H  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_cfg(out_dir, steps=4, **parallel):
    cfg = H.tiny_cfg(out_dir, dtype="fp32", **parallel)
    cfg.steps, cfg.save_interval, cfg.resume = steps, 2, True
    return cfg


def train(cfg):
    trainer = Trainer(build_training(cfg, verbose=False), H.synthetic_ds())
    return trainer, trainer.train()


def step_dir(out_dir, step):
    return os.path.join(resolve.checkpoints_root(out_dir), resolve.step_name(step))


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """An out_dir trained 4 steps, checkpoints at 2 and 4 (single process)."""
    out = str(tmp_path_factory.mktemp("run"))
    train(small_cfg(out))
    return out


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_resume_takes_the_newest_complete_checkpoint_not_a_lagging_pointer(four_steps, tmp_path):
    out = copy_run(four_steps, str(tmp_path / "run"))
    with open(os.path.join(resolve.checkpoints_root(out), "latest"), "w") as f:
        f.write("step_00000002")      # killed between publishing step 4 and rewriting latest
    trainer, hist = train(small_cfg(out, steps=6))
    assert [h["step"] for h in hist] == [5, 6]


def test_truncated_model_file_stops_with_one_line_naming_it_and_the_older_checkpoint(four_steps, tmp_path):
    out = copy_run(four_steps, str(tmp_path / "run"))
    model_pt = os.path.join(step_dir(out, 4), "model.pt")
    os.truncate(model_pt, os.path.getsize(model_pt) // 2)
    with pytest.raises(CheckpointError) as err:
        train(small_cfg(out, steps=6))
    message = str(err.value)
    assert "\n" not in message and model_pt in message and "truncated" in message
    assert f"--resume_from {step_dir(out, 2)}" in message
    cfg = small_cfg(out, steps=6)          # the flag the message names works
    cfg.resume_from = step_dir(out, 2)
    _, hist = train(cfg)
    assert [h["step"] for h in hist] == [3, 4, 5, 6]


def test_converter_on_a_truncated_checkpoint_is_one_line_and_nonzero(four_steps, tmp_path):
    out = copy_run(four_steps, str(tmp_path / "run"))
    model_pt = os.path.join(step_dir(out, 4), "model.pt")
    os.truncate(model_pt, 100 * 1024 if os.path.getsize(model_pt) > 100 * 1024 else 100)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "to-hf", out,
                           str(tmp_path / "hf"), "--model-type", "olmoe"], capture_output=True, text=True)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and model_pt in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "hf")


def test_shape_mismatch_in_one_process_is_one_line(four_steps, tmp_path):
    out = copy_run(four_steps, str(tmp_path / "run"))
    cfg = small_cfg(out, steps=6)
    cfg.model.moe.expert_hidden = 16
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert "\n" not in str(err.value) and "the model configs differ" in str(err.value)


def _save_sharded(rank, world_size, out_dir):
    cfg = small_cfg(out_dir, steps=2, ep=2)
    train(cfg)
    return step_dir(out_dir, 2)


def _resume_sharded(rank, world_size, out_dir):
    try:
        train(small_cfg(out_dir, steps=4, ep=2))
    except CheckpointError as err:
        return str(err)
    return None


def test_truncated_rank_file_is_one_line_on_every_rank_and_in_one_process(tmp_path):
    out = str(tmp_path / "run")
    ckpt = H.spawn(2, _save_sharded, out)
    rank_file = os.path.join(ckpt, "model_rank1.pt")
    os.truncate(rank_file, os.path.getsize(rank_file) - 7)
    with pytest.raises(CheckpointError, match="model_rank1.pt is truncated") as err:   # one process
        from megamoe.checkpoint.consolidate import consolidate
        files.verify(ckpt)
        consolidate(ckpt)
    assert "\n" not in str(err.value)
    message = H.spawn(2, _resume_sharded, out)     # rank 0's message; rank 1 raised the same
    assert message is not None and rank_file in message and "\n" not in message


def _count_exchange_times_out(rank, world_size):
    from megamoe.parallel.expert import AllToAllDispatcher
    from megamoe.parallel.guard import CollectiveTimeout
    from megamoe.parallel.mesh import ParallelMesh, make_layout
    mesh = ParallelMesh(make_layout(2, 1, 1, 0, 2, 1), rank, timeout_s=2)
    dispatcher = AllToAllDispatcher(4, mesh.group("ep"))
    if rank == 1:          # never joins the exchange
        time.sleep(4)
        return None
    x, topk = torch.randn(6, 8), torch.randint(0, 4, (6, 2))
    try:
        dispatcher.dispatch(x, topk)
    except CollectiveTimeout as err:
        return str(err)
    return "no timeout"


def test_a_stuck_count_exchange_names_the_ep_group():
    message = H.spawn(2, _count_exchange_times_out)
    assert message is not None and "'ep' (ranks 0,1)" in message and "2 s (parallel.timeout_s)" in message
