"""Correctness of the all-to-all byte counting of benchmarks/ep_alltoall_bytes.py (not a timing).

World 2, EP2, one fp32 training step of the tiny MoE on gloo. megamoe's dispatcher (dedup, the
default) sends one row per (token, remote EP rank) pair, with no padding, so the row bytes counted
at torch.distributed.all_to_all_single must equal the dedup minimum 4 x pairs x hidden x 4 bytes
exactly, be below the per-expert minimum (4 x remote token copies x hidden x 4) whenever a token
has two experts on one remote rank, agree with the dispatcher's own byte_counter; the routing
metadata (K int8 local expert ids per pair, K fp32 routing weights and their gradients) is
counted apart, and the count exchange is (ep-1) x (E/ep + 1) x 8 bytes per rank per MoE layer.
The old per-expert dispatch (dedup=False) still sends exactly its own minimum.
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
def bench():
    return _load()


@pytest.fixture(scope="module")
def step(bench):
    return bench.measure(world=2, ep=2, steps=1)[0]


def test_counted_row_bytes_equal_the_dedup_minimum(step):
    assert step["remote_pairs"] > 0, "the routing sent nothing off-rank: the test would be vacuous"
    assert step["elem"] == 4 and step["hidden"] == 64 and step["dedup"]
    assert step["dedup_minimum"] == 4 * step["remote_pairs"] * step["hidden"] * step["elem"]
    assert step["minimum"] == 4 * step["remote_slots"] * step["hidden"] * step["elem"]
    # No padding (exact split sizes): one row per (token, remote rank) pair, exactly.
    assert step["ratio_dedup"] == pytest.approx(1.0, abs=1e-12)
    assert step["fwd"] == step["bwd"] == step["dedup_minimum"] // 2
    # top-2 of 8 experts on 2 ranks: some tokens have both experts on one remote rank.
    assert step["remote_pairs"] < step["remote_slots"]
    assert step["measured"] < step["minimum"] and step["ratio"] < 1.0


def test_counters_agree(step):
    # megamoe's own per-exchange attribution sums to what all_to_all_single saw.
    assert step["attributed_rows"] == step["measured"]
    assert step["attributed_total"] == step["measured"] + step["meta"]
    assert set(step["attributed"]) == {"dispatch.fwd", "dispatch.bwd", "combine.fwd", "combine.bwd",
                                       "dispatch_ids.fwd", "combine_weights.fwd", "combine_weights.bwd"}
    # Metadata per remote pair: K int8 ids, K fp32 weights forward and their gradients backward.
    assert step["meta"] == step["remote_pairs"] * (2 * 1 + 2 * 2 * 4)
    # Count exchange: world 2 x 2 MoE layers x (ep-1) x (E/ep slot counts + 1 pair count) x 8 B.
    assert step["counts"] == step["counts_expected"] == 2 * 2 * 1 * (4 + 1) * 8
    assert step["other"] == 0


def test_per_expert_dispatch_sends_its_own_minimum(bench):
    old = bench.measure(world=2, ep=2, steps=1, dedup=False)[0]
    assert not old["dedup"] and old["remote_slots"] > 0
    assert old["ratio"] == pytest.approx(1.0, abs=1e-12)
    assert old["fwd"] == old["bwd"] == old["minimum"] // 2
    assert old["attributed_total"] == old["attributed_rows"] == old["measured"] and old["meta"] == 0
    assert set(old["attributed"]) == {"dispatch.fwd", "dispatch.bwd", "combine.fwd", "combine.bwd"}
    assert old["counts"] == old["counts_expected"] == 2 * 2 * 1 * 4 * 8
    assert old["other"] == 0


def test_the_script_ends_with_the_dedup_ratio(bench, capsys):
    bench.main(["--configs", "2:2", "--steps", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    name, value = last.split()
    assert name == "bytes_vs_dedup_minimum" and float(value) <= 1.0
