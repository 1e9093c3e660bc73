"""Real Slurm jobs on a one-node cluster on this machine (started by .ci/install_slurm.sh).

Submits the example scripts from examples/slurm with 2 CPU tasks (gloo) and a small model:
  - train.sbatch (srun, one task per rank): `scancel --signal=USR1` (signals the job's steps)
    after a few steps -> checkpoint, `scontrol requeue`, the requeued job resumes at the
    checkpoint step and finishes (not requeued again); over the whole run the loss falls;
  - train_torchrun.sbatch (one torchrun per node) with the signal sent to the batch shell
    (`scancel --batch`, like #SBATCH --signal=B:USR1@120) -> same save / requeue / resume;
  - a config error ends the job with ExitCode 2:0 under srun, also when another rank is still
    starting and srun kills it (143), and under torchrun, whose traceback is replaced by one line;
  - a time limit shorter than the USR1 offset (--time=2 with B:USR1@120) is warned about at start.
Skips when Slurm is not installed and cannot be (not root, no apt), when the node never gets
idle, or when the cluster found is not the local test cluster (ClusterName megamoe-ci; set
MEGAMOE_SLURM_ANY_CLUSTER=1 to submit to another one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slurm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER_TIMEOUT_S = 90       # install (if needed) + daemons up + node idle
JOB_TIMEOUT_S = 150          # one job from submission to its end (a requeue adds ~15 s)

# Small enough for 2 ranks on 2 cores: ~0.2 s per step after a ~8 s start.
TRAIN_ARGS = ("--model.seq_length 64 --model.num_layers 2 --micro_batch_size 4 --global_batch_size 8 "
              "--eval_interval 0 --log_interval 5 --optim.warmup_steps 5 --data.corpus_docs 40")


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _node_idle() -> bool:
    try:
        out = _run(["sinfo", "-h", "-o", "%t"], timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return False
    return any(s in ("idle", "mix", "alloc") for s in out)


def _cluster_name() -> str:
    try:
        out = _run(["scontrol", "show", "config"], timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(r"^ClusterName\s*=\s*(\S+)", out, re.M)
    return m.group(1) if m else ""


@pytest.fixture(scope="module")
def cluster():
    """A running one-node cluster, brought up by .ci/install_slurm.sh if needed."""
    if not _node_idle():
        if os.geteuid() != 0:
            pytest.skip("no idle Slurm node, and starting the local test cluster needs root")
        try:
            res = _run(["bash", os.path.join(ROOT, ".ci", "install_slurm.sh")], timeout=CLUSTER_TIMEOUT_S + 300)
        except subprocess.TimeoutExpired:
            pytest.skip("install_slurm.sh took too long")
        if "will be skipped" in res.stdout or shutil.which("sbatch") is None:
            pytest.skip(f"no local Slurm cluster: {res.stdout.strip()[-300:]}")
        deadline = time.time() + 15     # the script itself waits for the node; a short grace
        while not _node_idle():
            if time.time() > deadline:
                pytest.skip(f"no idle Slurm node: {res.stdout.strip()[-300:]}")
            time.sleep(1)
    name = _cluster_name()
    if name != "megamoe-ci" and os.environ.get("MEGAMOE_SLURM_ANY_CLUSTER") != "1":
        pytest.skip(f"the Slurm cluster here is {name or 'unknown'!r}, not the local test cluster "
                    f"megamoe-ci; set MEGAMOE_SLURM_ANY_CLUSTER=1 to submit test jobs to it")
    yield


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("slurm_data_cache"))


def submit(script: str, out_dir: str, log: str, extra_args: str, sbatch_opts: list[str],
           env: dict | None = None) -> str:
    env = {**os.environ, "OUT_DIR": out_dir, "EXTRA_ARGS": extra_args, "MEGAMOE_ROOT": ROOT,
           "PYTHONPATH": ROOT, **(env or {})}
    res = subprocess.run(["sbatch", "--parsable", f"--output={log}", "--time=10:00", *sbatch_opts,
                          os.path.join(ROOT, "examples", "slurm", script)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def job_state(job_id: str) -> str:
    out = _run(["scontrol", "show", "job", "-o", job_id]).stdout
    m = re.search(r"JobState=(\w+)", out)
    return m.group(1) if m else "GONE"


def read_log(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_for(predicate, timeout: float, what: str, job_id: str, log: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            _run(["scancel", job_id])
            pytest.fail(f"timed out waiting for {what}; job {job_id} is {job_state(job_id)}; "
                        f"log tail:\n{read_log(log)[-3000:]}")
        time.sleep(0.5)


def wait_done(job_id: str, log: str, timeout: float = JOB_TIMEOUT_S) -> str:
    wait_for(lambda: job_state(job_id) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                           "OUT_OF_MEMORY", "GONE"),
             timeout, "the job to end", job_id, log)
    return job_state(job_id)


def metrics(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:   # the line being written right now
                break
    return rows


def run_state(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "run_state.json")) as f:
        return json.load(f)


def _signal_requeue_resume(script, sbatch_opts, scancel_opts, data_cache, tmp_path, steps, env=None):
    """Submit, signal USR1 after a few steps, then check: checkpoint at the stop step, requeue,
    and the requeued job resumes from it. Returns (job, out_dir, log, stop_step)."""
    out_dir, log = str(tmp_path / "run"), str(tmp_path / "job.out")
    job = submit(script, out_dir, log,
                 f"--parallel.backend gloo --steps {steps} --save_interval 0 "
                 f"--data.cache_dir {data_cache} {TRAIN_ARGS}", sbatch_opts,
                 env={"CONFIG": "examples/configs/tiny.yaml", **(env or {})})
    # Signal once training runs (handlers are installed long before the first step is logged).
    wait_for(lambda: len(metrics(out_dir)) >= 3, JOB_TIMEOUT_S, "the first steps", job, log)
    res = _run(["scancel", *scancel_opts, "--signal=USR1", job])
    assert res.returncode == 0, res.stderr
    wait_for(lambda: "requeueing job" in read_log(log), 60, "the requeue", job, log)
    state = run_state(out_dir)
    stop_step = state["step"]
    assert state["state"] == "stopped" and state["signal"] == 10 and 3 <= stop_step < steps, state
    assert os.path.isdir(os.path.join(out_dir, "checkpoints", f"step_{stop_step:08d}"))
    # Requeued: the same job runs again (restart 1) and resumes at the stop step.
    wait_for(lambda: "resumed from" in read_log(log), JOB_TIMEOUT_S, "the resume", job, log)
    text = read_log(log)
    assert "restart 1" in text and "world size 2" in text, text[-3000:]
    assert re.search(rf"resumed from \S+step_{stop_step:08d} at step {stop_step}\b", text), text[-3000:]
    return job, out_dir, log, stop_step


def test_usr1_to_steps_checkpoints_requeues_and_resumes(cluster, data_cache, tmp_path):
    # scancel --signal=USR1 JOB signals the job's steps: the 2 training ranks under srun.
    # 60 steps of ~0.1 s: the stop (a second or two after the signal) lands well before the end.
    steps = 60
    job, out_dir, log, stop_step = _signal_requeue_resume(
        "train.sbatch", ["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"], [],
        data_cache, tmp_path, steps=steps)
    assert wait_done(job, log) == "COMPLETED", read_log(log)[-4000:]
    text = read_log(log)
    assert "2 task(s)" in text and "restart 2" not in text, text[-3000:]
    assert text.count("requeueing job") == 1, text[-3000:]       # the finished run is not requeued
    rows = metrics(out_dir)
    # Before the stop: 1..stop_step; after the resume: stop_step+1..steps (nothing redone, nothing skipped).
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), [r["step"] for r in rows]
    assert run_state(out_dir) == {"state": "finished", "step": steps, "steps": steps, "signal": None}
    # The 2-rank run learns across the stop and the resume.
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)


def test_torchrun_variant_batch_signals(cluster, data_cache, tmp_path):
    # --batch signals only the batch shell, as #SBATCH --signal=B:USR1@120 does before the time
    # limit: the script forwards it through srun and the node wrapper to the torchrun workers.
    # USR1 -> checkpoint + requeue + resume; then TERM (a cancel) -> checkpoint, no requeue.
    steps = 500                                        # never reached: TERM ends the run
    job, out_dir, log, stop_step = _signal_requeue_resume(
        "train_torchrun.sbatch", ["--gpus-per-node=0", "--nodes=1", "--cpus-per-task=2"], ["--batch"],
        data_cache, tmp_path, steps=steps, env={"GPUS_PER_NODE": "2"})
    wait_for(lambda: len(metrics(out_dir)) >= stop_step + 3, JOB_TIMEOUT_S, "steps after the resume", job, log)
    res = _run(["scancel", "--batch", "--signal=TERM", job])
    assert res.returncode == 0, res.stderr
    # (torchrun itself also gets TERM from Slurm and exits non-zero after its workers: FAILED is fine)
    assert wait_done(job, log) in ("COMPLETED", "FAILED"), read_log(log)[-4000:]
    text = read_log(log)
    assert "batch shell got SIGUSR1" in text and "batch shell got SIGTERM" in text, text[-3000:]
    assert "passing it to the workers" in text and text.count("requeueing job") == 1, text[-3000:]
    state = run_state(out_dir)
    assert state["state"] == "stopped" and state["signal"] == 15 and stop_step + 3 <= state["step"] < steps
    assert os.path.isdir(os.path.join(out_dir, "checkpoints", f"step_{state['step']:08d}"))
    assert [r["step"] for r in metrics(out_dir)] == list(range(1, state["step"] + 1))


BAD_CONFIG = "--model.moe.top_k 99"
CONFIG_ERROR = "megamoe train: error: model.moe.top_k (99) must be between 1 and model.moe.num_experts (8)"


def exit_code(job_id: str) -> str:
    m = re.search(r"ExitCode=(\S+)", _run(["scontrol", "show", "job", "-o", job_id]).stdout)
    return m.group(1) if m else "?"


def test_config_error_exits_2_even_when_srun_kills_a_slower_rank(cluster, data_cache, tmp_path):
    # Rank 1 is slow to start (as a rank still importing torch): rank 0 fails first with 2, srun
    # SIGTERMs rank 1 (143) and returns the highest code, 143; the job must still end with 2.
    slow = tmp_path / "slow_python.sh"
    slow.write_text(f'#!/bin/bash\n[ "$SLURM_PROCID" = 1 ] && sleep 60\nexec {sys.executable} "$@"\n')
    slow.chmod(0o755)
    out_dir, log = str(tmp_path / "run"), str(tmp_path / "job.out")
    job = submit("train.sbatch", out_dir, log, f"--parallel.backend gloo {BAD_CONFIG} {TRAIN_ARGS}",
                 ["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1"],
                 env={"CONFIG": "examples/configs/tiny.yaml", "PYTHON": str(slow)})
    assert wait_done(job, log) == "FAILED", read_log(log)[-3000:]
    text = read_log(log)
    assert exit_code(job) == "2:0", text[-3000:]
    assert CONFIG_ERROR in text and "task 1: Exited with exit code 143" in text, text[-3000:]
    assert "task 0 failed first, with exit code 2 (the launcher returned 143" in text, text[-3000:]
    assert "requeueing" not in text


def test_torchrun_config_error_exits_2_with_one_line_per_failure(cluster, data_cache, tmp_path):
    out_dir, log = str(tmp_path / "run"), str(tmp_path / "job.out")
    job = submit("train_torchrun.sbatch", out_dir, log, f"--parallel.backend gloo {BAD_CONFIG} {TRAIN_ARGS}",
                 ["--gpus-per-node=0", "--nodes=1", "--cpus-per-task=2"],
                 env={"CONFIG": "examples/configs/tiny.yaml", "GPUS_PER_NODE": "2"})
    assert wait_done(job, log) == "FAILED", read_log(log)[-3000:]
    text = read_log(log)
    assert exit_code(job) == "2:0", text[-3000:]
    assert CONFIG_ERROR in text, text[-3000:]
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-3000:]
    pointers = [line for line in text.splitlines() if "failed first, with exit code 2" in line]
    assert len(pointers) == 1 and pointers[0].startswith("torchrun ["), text[-3000:]


def test_time_limit_shorter_than_the_usr1_offset_warns_at_start(cluster, data_cache, tmp_path):
    out_dir, log = str(tmp_path / "run"), str(tmp_path / "job.out")
    job = submit("train.sbatch", out_dir, log, f"--parallel.backend gloo --steps 5 {TRAIN_ARGS}",
                 ["--gpus-per-node=0", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=2"],
                 env={"CONFIG": "examples/configs/tiny.yaml", "MAX_REQUEUES": "0"})
    wait_for(lambda: "WARNING" in read_log(log), 60, "the time-limit warning", job, log)
    _run(["scancel", job])          # its USR1 is due at once: nothing more to see
    wait_done(job, log)
    warning = [line for line in read_log(log).splitlines() if "WARNING" in line]
    assert len(warning) == 1, read_log(log)[-3000:]
    assert "time limit 120 s" in warning[0] and "SIGUSR1 120 s before the end" in warning[0], warning
