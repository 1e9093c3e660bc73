"""What `python -m megamoe train` prints, end to end (subprocesses, stdout a pipe as in Slurm):
  - a 3-step run into a pipe: no progress-bar carriage returns (the bar is for terminals);
  - a two-rank expert-parallel run under torchrun prints the same parameter line as one process
    (the whole model, not rank 0's share), plus one line with what each rank holds."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--model.seq_length", "32", "--model.num_layers", "2", "--micro_batch_size", "2",
        "--global_batch_size", "4", "--eval_interval", "0", "--log_interval", "1", "--save_interval", "0",
        "--optim.warmup_steps", "1", "--data.corpus_docs", "20", "--tensorboard", "false",
        "--resume", "false", "--progress", "true", "--parallel.backend", "gloo"]
PARAM_LINE = re.compile(r"^megamoe: (\S+ parameters \(\S+ active\)),", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(launcher: list[str], out_dir: str, cache: str, steps: int, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        env.pop(var, None)
    res = subprocess.run([*launcher, "-m", "megamoe", "train", *ARGS, "--steps", str(steps),
                          "--out_dir", out_dir, "--data.cache_dir", cache, *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("run_output_cache"))


@pytest.fixture(scope="module")
def single(cache, tmp_path_factory):
    return train([sys.executable], str(tmp_path_factory.mktemp("single")), cache, 3)


def test_three_step_run_into_a_pipe_prints_no_carriage_returns(single):
    assert single.count("\r") <= 2, repr(single[-1500:])     # tqdm wrote 11 here
    assert len(re.findall(r"^step \d+ \|", single, re.M)) == 3, single[-1500:]


def test_two_rank_ep_run_prints_the_single_process_parameter_line(single, cache, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    ep2 = train(torchrun, str(tmp_path / "ep2"), cache, 1, "--parallel.ep", "2")
    one, two = PARAM_LINE.findall(single), PARAM_LINE.findall(ep2)
    assert len(one) == 1 and two == one, (one, two, ep2[-2000:])
    assert "world size 2" in ep2
    # What each rank holds (attention everywhere, half of the experts) is said on its own line.
    held = re.findall(r"^megamoe: each of the 2 ranks holds (\S+) of them$", ep2, re.M)
    assert len(held) == 1 and float(held[0].rstrip("M")) < float(one[0].split("M")[0]), ep2[-2000:]
