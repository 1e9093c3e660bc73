"""The Slurm scripts' pieces that need no cluster (tests/slurm/test_slurm_jobs.py runs real jobs):

  - task.sh notes how a task failed (exit code, SIGTERM seen) and passes the code on;
  - megamoe_first_failure (common.sh) picks the first task that failed by itself;
  - megamoe_check_time_limit (common.sh) warns when the time limit leaves no time before the
    stop signal, naming both numbers (scontrol replaced by a stand-in on PATH);
  - torchrun_node.sh with a config error: exit code 2 (torchrun itself exits 1), megamoe's one
    line per worker and one line naming the failing worker, no ChildFailedError traceback;
  - launch_torchrun.py's report of a worker killed by a signal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_DIR = os.path.join(ROOT, "examples", "slurm")
COMMON = os.path.join(SLURM_DIR, "common.sh")
TASK = os.path.join(SLURM_DIR, "task.sh")


def bash(script: str, env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


# ------------------------------------------------------------------------------------ task.sh

def test_task_records_a_failure_and_keeps_its_exit_code(tmp_path):
    env = {"MEGAMOE_TASK_EXITS": str(tmp_path), "SLURM_PROCID": "3"}
    res = bash(f"bash {TASK} bash -c 'exit 2'", env)
    assert res.returncode == 2
    ns, code, term = (tmp_path / "task_3").read_text().split()
    assert code == "2" and term == "-" and int(ns) > 0
    # A task that succeeds leaves nothing; without MEGAMOE_TASK_EXITS nothing is written.
    assert bash(f"bash {TASK} true", {**env, "SLURM_PROCID": "4"}).returncode == 0
    assert bash(f"bash {TASK} bash -c 'exit 5'", {"MEGAMOE_TASK_EXITS": ""}).returncode == 5
    assert sorted(os.listdir(tmp_path)) == ["task_3"]


def test_task_marks_a_failure_after_sigterm(tmp_path):
    """As srun --kill-on-bad-exit does, SIGTERM goes to every process of the task: the command
    dies of it (143) and task.sh notes that it was stopped, not that it failed by itself."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen(["bash", TASK, "bash", "-c", f"touch {ready}; sleep 30"], cwd=ROOT,
                            env={**os.environ, "MEGAMOE_TASK_EXITS": str(tmp_path), "SLURM_PROCID": "1"},
                            start_new_session=True)
    deadline = time.time() + 20
    while not ready.exists():
        assert time.time() < deadline and proc.poll() is None, "the command never started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    # sleep may outlive its shell briefly; the process group's TERM reached it too.
    assert proc.wait(timeout=20) == 143
    _, code, term = (tmp_path / "task_1").read_text().split()
    assert (code, term) == ("143", "TERM")


# ------------------------------------------------------------------ megamoe_first_failure

def first_failure(tmp_path, records: dict[int, str]) -> str:
    for task, line in records.items():
        (tmp_path / f"task_{task}").write_text(line + "\n")
    res = bash(f"source {COMMON}; megamoe_first_failure {tmp_path}")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_first_failure_is_the_earliest_task_not_stopped_by_sigterm(tmp_path):
    # task 1 was SIGTERMed first (143), task 0 failed by itself (2), task 2 failed later (1).
    assert first_failure(tmp_path, {1: "100 143 TERM", 0: "200 2 -", 2: "300 1 -"}) == "2 0"


def test_first_failure_is_empty_when_every_failed_task_was_stopped(tmp_path):
    assert first_failure(tmp_path / "none", {}) == ""       # no task failed (or none got to say)
    assert first_failure(tmp_path, {0: "100 143 TERM", 1: "200 137 TERM"}) == ""


# ------------------------------------------------------------- megamoe_check_time_limit

@pytest.fixture
def fake_slurm(tmp_path):
    """A stand-in scontrol that reports $FAKE_LIMIT as the job's time limit, and a batch script
    with #SBATCH --signal=B:USR1@120 (as examples/slurm/train.sbatch)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/bash\necho "JobId=7 JobName=x TimeLimit=$FAKE_LIMIT Restarts=0"\n')
    scontrol.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --time=2\n#SBATCH --signal=B:USR1@120\n#SBATCH --requeue\n")
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "MEGAMOE_BATCH_SCRIPT": str(script),
            "SLURM_JOB_ID": "7", "SBATCH_SIGNAL": ""}


def check_time_limit(env: dict, limit: str, **extra) -> str:
    res = bash(f"source {COMMON}; megamoe_check_time_limit", {**env, "FAKE_LIMIT": limit, **extra})
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_time_limit_shorter_than_the_signal_offset_warns_with_both_numbers(fake_slurm):
    line = check_time_limit(fake_slurm, "00:02:00")          # --time=2 with B:USR1@120
    assert "WARNING" in line and "time limit 120 s" in line and "SIGUSR1 120 s before the end" in line
    assert "0 s of training per allocation" in line and "\n" not in line


def test_a_time_limit_with_room_to_train_is_silent(fake_slurm):
    assert check_time_limit(fake_slurm, "00:10:00") == ""
    assert check_time_limit(fake_slurm, "1-00:00:00") == ""
    assert check_time_limit(fake_slurm, "UNLIMITED") == ""


def test_sbatch_signal_from_the_environment_wins(fake_slurm):
    line = check_time_limit(fake_slurm, "00:10:00", SBATCH_SIGNAL="B:USR1@500")
    assert "time limit 600 s" in line and "500 s before the end" in line and "100 s of training" in line
    # 210 s: too short for the script's @120, enough for @10
    assert "WARNING" in check_time_limit(fake_slurm, "00:03:30")
    assert check_time_limit(fake_slurm, "00:03:30", SBATCH_SIGNAL="B:USR1@10") == ""


def test_slurm_durations_in_seconds():
    res = bash(f"source {COMMON}; for t in 2:00 00:02:00 10:00:00 1-00:00:00 2-3 45; do "
               "_megamoe_seconds $t; done; _megamoe_seconds UNLIMITED || echo none")
    assert res.stdout.split() == ["120", "120", "36000", "86400", "183600", "2700", "none"]


# --------------------------------------------------------------------------- torchrun variant

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_node_config_error_is_one_line_and_exit_code_2(tmp_path):
    env = {"GPUS_PER_NODE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHON": sys.executable, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0"}
    res = subprocess.run(["bash", os.path.join(SLURM_DIR, "torchrun_node.sh"), "--model.moe.top_k", "99",
                          "--parallel.backend", "gloo", "--out_dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=180, cwd=ROOT, env={**os.environ, **env})
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]           # torchrun alone: 1
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    error = "megamoe train: error: model.moe.top_k (99) must be between 1 and model.moe.num_experts (8)"
    assert 1 <= out.count(error) <= 2, out[-3000:]     # each worker that got that far says it once
    pointers = [line for line in out.splitlines() if "failed first" in line]
    assert len(pointers) == 1 and "with exit code 2" in pointers[0], out[-3000:]
    assert "its error is in its own output above" in pointers[0]


def test_launch_torchrun_reports_a_worker_killed_by_a_signal():
    sys.path.insert(0, SLURM_DIR)
    try:
        import launch_torchrun
    finally:
        sys.path.remove(SLURM_DIR)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    failures = {3: ProcessFailure(local_rank=1, pid=4242, exitcode=-9, error_file="<N/A>")}
    line, code = launch_torchrun.failure_line(ChildFailedError("megamoe", failures), "node7")
    assert code == 137
    assert line == ("torchrun [node7]: worker rank 3 (local rank 1, pid 4242) failed first, with "
                    "signal 9 (exit code 137); its error is in its own output above")
    assert launch_torchrun.shell_code(2) == 2 and launch_torchrun.shell_code(-15) == 143
