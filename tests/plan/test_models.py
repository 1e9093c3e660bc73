"""Unit checks of the planner's pieces: routing expectation, parameter table, FLOP classes, buckets."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest

from megamoe.config import preset
from megamoe.model.transformer import flops_per_token
from megamoe.plan.comm import group_link, hit_ranks_per_token, remote_ranks_per_token
from megamoe.plan.layouts import PlanLayout
from megamoe.plan.params import RankTensor, StageParams, model_table, stage_params, zero1_buckets
from megamoe.plan.timing import flop_classes


@pytest.mark.parametrize("experts,top_k,ep", [(8, 2, 2), (8, 2, 4), (8, 3, 4), (16, 4, 8), (6, 2, 3)])
def test_ranks_per_token_is_the_mean_over_all_subsets(experts, top_k, ep):
    local = experts // ep
    subsets = list(itertools.combinations(range(experts), top_k))
    hits = [len({e // local for e in s}) for s in subsets]
    assert hit_ranks_per_token(experts, top_k, ep) == Fraction(sum(hits), len(subsets))
    # remote, seen from EP rank 0: every rank the token reaches except rank 0
    remote = [len({e // local for e in s} - {0}) for s in subsets]
    assert remote_ranks_per_token(experts, top_k, ep) == Fraction(sum(remote), len(subsets))


@pytest.mark.parametrize("name", ["olmoe-1b-7b", "mixtral-8x7b", "deepseek-moe-16b", "olmo-1b"])
def test_flop_classes_add_up_to_the_trainers_formula(name):
    m = preset(name).model
    fc = flop_classes(m)
    assert fc.total == flops_per_token(m)
    assert fc.attn_proj > 0 and fc.attn_core > 0 and fc.head > 0
    assert (fc.moe_routed > 0) == (m.moe is not None)


@pytest.mark.parametrize("name", ["olmoe-1b-7b", "mixtral-8x7b", "deepseek-moe-16b", "olmo-1b"])
@pytest.mark.parametrize("tp,pp,ep,etp", [(1, 1, 1, 1), (2, 4, 8, 1), (4, 2, 2, 2)])
def test_shards_times_replicas_give_the_whole_model(name, tp, pp, ep, etp):
    cfg = preset(name)
    m = cfg.model
    if m.moe is None and (ep, etp) != (1, 1):
        pytest.skip("dense model")
    lay = PlanLayout(tp, pp, 1, 16 // (tp * pp) or 1, ep, etp, False, 1, "none", tp > 1)
    entries, total, _ = model_table(m)
    stages = stage_params(m, lay)
    dense = sum(s.numel_of("dp") for s in stages)
    expert = sum(s.numel_of("edp") for s in stages)
    tp_cut = {e.name: e.cut in ("vocab", "tp0", "tp1") for e in entries}
    sharded = sum(t.numel for s in stages for t in s.tensors if tp_cut.get(t.name, True) and t.group == "dp")
    tied_copy = m.tie_embeddings and pp > 1
    head = m.vocab_size * m.d_model // tp if tied_copy else 0
    assert sharded * tp + (dense - sharded) + expert * ep * etp - head == total


def test_zero1_buckets_follow_the_optimizers_order_and_split():
    stage = StageParams(0, [RankTensor("a", 10, "dp", True), RankTensor("b", 5, "dp", False),
                            RankTensor("c", 30, "edp", True), RankTensor("d", 7, "dp", True, deferred=True),
                            RankTensor("e", 12, "dp", True)])
    # backward order (e, d, c, b, a); dp: decay (immediate, deferred), no decay; then edp
    assert zero1_buckets(stage, bucket_numel=1000) == [("dp", 22), ("dp", 7), ("dp", 5), ("edp", 30)]
    assert zero1_buckets(stage, bucket_numel=15) == [("dp", 12), ("dp", 10), ("dp", 7), ("dp", 5), ("edp", 30)]


def test_group_links_follow_the_rank_order():
    assert group_link(1, 8, 8).intra                     # tp 8 inside a node
    assert not group_link(8, 2, 8).intra                 # the next pipeline stage is another node
    assert group_link(2, 4, 8).intra                     # ep 4 at stride etp 2: one node
    link = group_link(1, 16, 8)
    assert link.nodes == 2 and link.inter_fraction() == pytest.approx(8 / 15)
