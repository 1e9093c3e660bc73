"""benchmarks/convert_memory.py runs both conversions at a tiny size and ends with its ratio line
(the value is not asserted: at this size the python + torch import baseline dominates; the
recorded >= 1 GB figure is in benchmarks/RESULTS.md)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_convert_memory_prints_its_ratio(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/convert_memory.py", "--size-gb", "0.005",
                          "--shards", "3", "--workdir", str(tmp_path / "work")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"peak_rss_over_largest_shards [0-9]+\.[0-9]+", lines[-1]), lines[-1]
    assert any(line.startswith("from-hf: peak RSS") for line in lines)
    assert any(line.startswith("to-hf: peak RSS") for line in lines)
    # The converted model is complete: several input shards, a published megamoe checkpoint.
    work = tmp_path / "work"
    assert sum(f.endswith(".safetensors") for f in os.listdir(work / "hf")) >= 3
    assert os.path.isfile(work / "mm" / "checkpoints" / "step_00000000" / "COMPLETE")
    assert os.path.isfile(work / "back" / "model.safetensors.index.json")
