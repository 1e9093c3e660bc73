"""Correctness of the all-to-all byte counting of benchmarks/ep_alltoall_bytes.py (not a timing).

World 2, EP2, one fp32 training step of the tiny MoE on gloo: megamoe's dispatcher sends exactly
the routed rows (no padding), so the bytes counted at torch.distributed.all_to_all_single must
equal the minimum 4 x (token copies routed off-rank) x hidden x 4 bytes, agree with the
dispatcher's own byte_counter, and the count exchange must be (ep-1)/ep x E x 8 bytes per rank
per MoE layer.
"""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load():
    path = os.path.join(ROOT, "benchmarks", "ep_alltoall_bytes.py")
    spec = importlib.util.spec_from_file_location("ep_alltoall_bytes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def step():
    return _load().measure(world=2, ep=2, steps=1)[0]


def test_counted_bytes_equal_the_minimum(step):
    assert step["remote_slots"] > 0, "the routing sent nothing off-rank: the test would be vacuous"
    assert step["elem"] == 4 and step["hidden"] == 64
    assert step["minimum"] == 4 * step["remote_slots"] * step["hidden"] * step["elem"]
    # Padding documented by the benchmark: none (exact split sizes), so the ratio is 1 exactly.
    assert step["ratio"] == pytest.approx(1.0, abs=1e-12)
    assert step["fwd"] == step["bwd"] == step["minimum"] // 2


def test_counters_agree(step):
    # megamoe's own per-exchange attribution sums to what all_to_all_single saw.
    assert step["attributed_total"] == step["measured"]
    assert set(step["attributed"]) == {"dispatch.fwd", "dispatch.bwd", "combine.fwd", "combine.bwd"}
    # Count exchange: world 2 x 2 MoE layers x (ep-1) x E/ep x 8 bytes, and nothing else.
    assert step["counts"] == step["counts_expected"] == 2 * 2 * 1 * 4 * 8
    assert step["other"] == 0
