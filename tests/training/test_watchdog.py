"""StepWatchdog: a hung step is reported (step number, limit, stack of the stuck code); abort mode
ends the process with WATCHDOG_EXIT_CODE, also when the hang is inside Trainer.train()."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np

from megamoe.training.watchdog import WATCHDOG_EXIT_CODE, StepWatchdog

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stuck_in_collective(seconds):  # a recognisable frame for the stack dump
    time.sleep(seconds)


def test_hung_step_is_reported_once_with_stack(tmp_path):
    log = tmp_path / "watchdog.log"
    with open(log, "w") as f:
        wd = StepWatchdog(0.3, abort=False, rank=3, file=f, poll_s=0.05).start()
        try:
            with wd.step(1):
                time.sleep(0.05)            # a fast step: nothing reported
            with wd.step(7):
                stuck_in_collective(1.0)    # > 3 x the limit: still one report
            with wd.step(8):
                pass
        finally:
            wd.stop()
    text = log.read_text()
    assert wd.reports == 1
    assert "megamoe watchdog: rank 3: step 7 has run for" in text
    assert "longer than watchdog_s=0.3" in text and "still waiting" in text
    assert "step 1 " not in text and "step 8" not in text
    # The dump shows where the main thread hangs.
    assert "stuck_in_collective" in text and "test_watchdog.py" in text


def test_watchdog_stops_cleanly_without_steps():
    wd = StepWatchdog(0.1, poll_s=0.02).start()
    time.sleep(0.15)                           # idle between steps: never a report
    wd.stop()
    assert wd.reports == 0 and wd._thread is None


ABORT_SCRIPT = textwrap.dedent("""
    import time
    from megamoe.training.watchdog import StepWatchdog
    wd = StepWatchdog(0.3, abort=True, rank=0, poll_s=0.05).start()
    with wd.step(12):
        time.sleep(60)
    print("not reached")
""")


def test_abort_mode_exits_non_zero():
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", ABORT_SCRIPT], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert res.returncode == WATCHDOG_EXIT_CODE, (res.returncode, res.stderr)
    assert time.monotonic() - t0 < 30
    assert "step 12 has run for" in res.stderr and "aborting" in res.stderr
    assert "not reached" not in res.stdout


class HangingData:
    """Sample reads hang from the 3rd step on (a dead file system, a stuck data worker...)."""

    def __init__(self):
        self.reads = 0

    def __len__(self):
        return 64

    def __getitem__(self, i):
        if self.reads >= 8:           # 2 steps x 4 samples
            read_blocks_forever()
        self.reads += 1
        return np.random.default_rng(i).integers(0, 256, size=17)


def read_blocks_forever():
    time.sleep(120)


def _train_with_hang(out_dir, log_path):
    """In a forked child (torch and the trainer are imported already: no interpreter start)."""
    import torch
    from megamoe.config import preset
    from megamoe.model.transformer import build_model
    from megamoe.training.trainer import Trainer
    from megamoe.training.build import build_training
    torch.set_num_threads(1)
    log = open(log_path, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    cfg = preset("tiny")
    m = cfg.model
    m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.seq_length, m.ffn_hidden = 256, 32, 1, 2, 16, 64
    m.moe.num_experts, m.moe.expert_hidden = 4, 32
    cfg.steps, cfg.micro_batch_size, cfg.global_batch_size = 5, 4, 4
    cfg.eval_interval, cfg.save_interval, cfg.log_interval = 0, 0, 1
    cfg.out_dir, cfg.progress, cfg.tensorboard = out_dir, False, False
    cfg.watchdog_s, cfg.watchdog_abort = 1, True
    Trainer(build_training(cfg, build_model(cfg.model, seed=0), device=torch.device("cpu"), verbose=False), HangingData()).train()
    print("not reached")


def test_trainer_hang_aborts_the_run(tmp_path):
    import multiprocessing

    import megamoe.training.trainer  # noqa: F401  (imported before the fork)
    log = tmp_path / "train.log"
    proc = multiprocessing.get_context("fork").Process(target=_train_with_hang, args=(str(tmp_path), str(log)))
    proc.start()
    proc.join(timeout=120)
    if proc.is_alive():
        proc.kill()
    text = log.read_text()
    assert proc.exitcode == WATCHDOG_EXIT_CODE, (proc.exitcode, text[-3000:])
    assert "step 1 " in text and "step 2 " in text          # two steps ran and were logged
    assert "rank 0: step 3 has run for" in text, text[-3000:]
    assert "longer than watchdog_s=1" in text and "read_blocks_forever" in text
    assert "not reached" not in text
