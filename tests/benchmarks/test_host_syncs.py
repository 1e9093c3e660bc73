"""The host-sync budget of an expert-parallel training step (benchmarks/host_syncs.py) holds:
at most one device-to-host transfer per MoE-layer forward, plus two per step."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_ep_step_stays_within_its_host_sync_budget():
    proc = subprocess.run([sys.executable, "benchmarks/host_syncs.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    match = re.fullmatch(r"host_syncs_per_step (\d+) budget (\d+)", last)
    assert match, proc.stdout + proc.stderr
    syncs, budget = map(int, match.groups())
    assert budget == 4 + 2          # 2 micro-batches x 2 MoE layers (selective recompute: once each)
    assert syncs <= budget and proc.returncode == 0, proc.stdout
    assert "expert.py" in proc.stdout        # the per-layer transfer is where it is documented
