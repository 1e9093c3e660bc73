"""The progress bar only on a terminal, and the per-device throughput field and its docs.

Slurm output files, CI logs and pipes are not terminals: there the bar is off and the plain
log lines are the only output per step (a bar would add a carriage-return line per update).
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch

from megamoe.config import preset
from megamoe.model.transformer import build_model
from megamoe.training.build import build_training
from megamoe.training.metrics import PEAK_ENV, format_console, progress_bar_wanted
from megamoe.training.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, SEQ = 128, 16


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Closed(io.StringIO):
    def isatty(self) -> bool:
        raise ValueError("I/O operation on closed file")


@pytest.mark.parametrize("stdout_tty, stderr_tty, wanted", [
    (True, True, True),      # an interactive terminal
    (False, True, False),    # `megamoe train > log`: the log lines go to a file
    (True, False, False),    # `2> err.log`: tqdm draws on stderr
    (False, False, False),   # Slurm output file, CI, `2>&1 | tee`
])
def test_progress_bar_only_when_both_streams_are_terminals(stdout_tty, stderr_tty, wanted):
    assert progress_bar_wanted(Stream(stdout_tty), Stream(stderr_tty)) is wanted


def test_progress_bar_off_for_streams_without_a_usable_isatty():
    assert progress_bar_wanted(Closed(), Stream(True)) is False
    assert progress_bar_wanted(object(), Stream(True)) is False


def small_cfg(out_dir: str, steps: int = 3):
    cfg = preset("tiny")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.seq_length, m.ffn_hidden = VOCAB, 32, 1, 2, SEQ, 64
    m.moe.num_experts, m.moe.top_k, m.moe.expert_hidden = 4, 2, 32
    cfg.steps, cfg.micro_batch_size, cfg.global_batch_size = steps, 2, 2
    cfg.eval_interval, cfg.save_interval, cfg.log_interval = 0, 0, 1
    cfg.out_dir, cfg.progress, cfg.tensorboard, cfg.watchdog_s = out_dir, True, False, 0
    return cfg


def test_three_step_run_into_a_pipe_writes_no_carriage_returns(tmp_path, capfd):
    """progress: true (the default) and stdout / stderr captured (not terminals): the 3 plain
    step lines and nothing else per step (tqdm wrote 11 carriage-return updates here)."""
    cfg = small_cfg(str(tmp_path))
    rng = np.random.default_rng(0)
    data = [rng.integers(0, VOCAB, size=SEQ + 1) for _ in range(16)]
    run = build_training(cfg, build_model(cfg.model, seed=0), device=torch.device("cpu"), verbose=False)
    Trainer(run, data).train()
    out, err = capfd.readouterr()
    assert "\r" not in out + err, repr((out + err)[-500:])
    assert [line.split(" |")[0] for line in out.splitlines() if line.startswith("step ")] == \
        ["step 1", "step 2", "step 3"]


def test_console_names_throughput_per_device():
    line = format_console({"step": 1, "loss": 1.0, "ce": 1.0, "lr": 1e-3, "grad_norm": 0.5,
                           "tokens_per_s": 10.0, "tflops_per_device": 0.25, "mfu": 0.5})
    assert "0.25 TFLOP/s/device" in line and "mfu 50.0%" in line and "gpu" not in line


def test_readme_documents_peak_tflops_and_the_field():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert PEAK_ENV in readme and "tflops_per_device" in readme
    assert "tflops_per_gpu" not in readme
