"""The model size printed at start (megamoe.parallel.params.count_params) is the whole model's,
the same in every parallel layout: 2 gloo ranks with EP, TP (+SP) and PP (tied embeddings, the
head's copy on the last stage) each count exactly what one process counts, while each rank
holds only its share."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from megamoe.config import preset
from megamoe.model.transformer import build_model
from megamoe.parallel.params import ParamCount, count_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parallel"))
import parallel_harness as H  # noqa: E402

# label -> (parallel settings, tie_embeddings, num_shared_experts)
LAYOUTS = {
    "ep2": (dict(ep=2), False, 0),
    "ep2_shared": (dict(ep=2), False, 1),
    "tp2_sp": (dict(tp=2, sequence_parallel=True), False, 0),
    "pp2_tied": (dict(pp=2), True, 0),
}


def layout_cfg(label: str):
    par, tied, shared = LAYOUTS[label]
    cfg = H.tiny_cfg(dtype="fp32", **par)
    cfg.model.tie_embeddings, cfg.model.moe.num_shared_experts = tied, shared
    return cfg


def single_process(cfg) -> tuple[int, int]:
    model = build_model(cfg.model, seed=0)
    return model.num_params(), model.num_params(active=True)


def count_layouts(rank, world_size, labels):
    from megamoe.training.build import build_training
    out = {}
    for label in labels:
        run = build_training(layout_cfg(label), device=torch.device("cpu"), verbose=False)
        out[label] = count_params(run.model)   # collective: every rank calls it
    return out


@pytest.fixture(scope="module")
def two_rank_counts():
    return H.spawn(2, count_layouts, list(LAYOUTS))


@pytest.mark.parametrize("label", list(LAYOUTS))
def test_two_ranks_count_what_one_process_counts(two_rank_counts, label):
    counts = two_rank_counts[label]
    total, active = single_process(layout_cfg(label))
    assert (counts.total, counts.active) == (total, active)
    assert len(counts.per_rank) == 2
    # Sharded / pipelined: each rank holds less than the whole (and says so in its own line).
    assert all(0 < n < total for n in counts.per_rank), counts.per_rank
    assert counts.describe_per_rank().startswith("each of the 2 ranks holds ")


def test_ep2_line_equals_the_single_process_line(two_rank_counts):
    cfg = layout_cfg("ep2")
    one = count_params(build_model(cfg.model, seed=0))
    assert two_rank_counts["ep2"].describe() == one.describe()
    assert one.describe_per_rank() is None        # one process: nothing to add


def test_single_process_counts_match_num_params():
    for name, tied, shared in [("tiny", False, 0), ("tiny", True, 2)]:
        cfg = preset(name)
        cfg.model.tie_embeddings, cfg.model.moe.num_shared_experts = tied, shared
        model = build_model(cfg.model, seed=0)
        c = count_params(model)
        assert (c.total, c.active, c.per_rank) == (model.num_params(), model.num_params(active=True),
                                                   [model.num_params()])


def test_describe_formats():
    c = ParamCount(3_938_432, 1_579_136, [2_368_000, 2_368_000])
    assert c.describe() == "3.94M parameters (1.58M active)"
    assert c.describe_per_rank() == "each of the 2 ranks holds 2.37M of them"
    c.per_rank = [1_200_000, 2_368_000]
    assert c.describe_per_rank() == "each of the 2 ranks holds 1.20M to 2.37M of them"
