"""Smoke test of the benchmark scripts: they run to the end on CPU and print their ratio lines.

Only that the lines are there is asserted, never the values (timings are not tested; see the
benchmarks themselves and benchmarks/RESULTS.md). The scripts run at once, with minimal sizes.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM = r"[0-9]+\.[0-9]+"

COMMANDS = {
    "moe_layer": ["benchmarks/moe_layer.py", "--shape", "tiny", "--tokens", "128", "--warmup", "0",
                  "--iters", "1", "--check", "--check-tokens", "64", "--device", "cpu"],
    "train_step": ["benchmarks/train_step.py", "--tiny", "--layers", "1", "--seq", "64", "--batch", "1",
                   "--warmup", "0", "--steps", "1", "--check", "--device", "cpu"],
    "ep_overlap": ["benchmarks/ep_overlap.py", "--tokens", "64", "--d-model", "32", "--expert-hidden", "32",
                   "--iters", "1"],
    "permute": ["benchmarks/permute.py", "--tokens", "64", "--experts", "8", "--top-k", "2",
                "--hidden", "32", "--warmup", "0", "--iters", "1", "--device", "cpu"],
}


def test_benchmarks_run_and_print_ratios():
    from megamoe import ops
    commands = dict(COMMANDS)
    if ops.backend("cpu") == "torch":   # extension not built: nothing to compare against
        commands.pop("permute")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = {name: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name, cmd in commands.items()}
    out = {}
    for name, p in procs.items():
        out[name], _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{name} exited {p.returncode}:\n{out[name]}"

    moe = out["moe_layer"]
    assert "check megamoe == hf[grouped_mm]" in moe and "MISMATCH" not in moe, moe
    for variant in ("dense_mlp", "megamoe[grouped_mm]", "megamoe[loop]", "hf[grouped_mm]", "hf[eager]"):
        # name, ms, TFLOP/s, ratio vs dense
        assert re.search(rf"^{re.escape(variant)}\s+{NUM}\s+{NUM}\s+{NUM}", moe, re.M), (variant, moe)
    assert re.search(rf"^ratio megamoe\[grouped_mm\] / hf\[grouped_mm\]: {NUM}$", moe, re.M), moe

    step = out["train_step"]
    assert "-> OK" in step, step
    for variant in ("megamoe", "hf[fp32]"):
        assert re.search(rf"^{re.escape(variant)}\s+{NUM}\s+[0-9]+\s+{NUM}", step, re.M), (variant, step)
    assert re.search(rf"^ratio megamoe / hf\[fp32\] \(tokens/s\): {NUM}$", step, re.M), step

    overlap = out["ep_overlap"].strip().splitlines()[-1]
    assert re.fullmatch(rf"overlapped_frac_chunks2 {NUM} chunks1 {NUM} idle_ratio_chunks2_vs_1 {NUM} "
                        rf"step_time_ratio_chunks2_vs_1 {NUM}", overlap), out["ep_overlap"]

    if "permute" not in out:
        return
    perm = out["permute"]
    assert "checked equal" in perm, perm
    assert re.search(rf"^ratio torch / extension: {NUM}x$", perm, re.M), perm
