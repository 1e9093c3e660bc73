"""Config: presets, YAML + dotted overrides, one-line validation errors."""

import pytest

from megamoe import config
from megamoe.config import load, preset, validate


def test_presets_validate():
    for name in config.PRESETS:
        validate(preset(name))
    olmoe = preset("olmoe-1b-7b").model
    assert (olmoe.moe.num_experts, olmoe.moe.top_k, olmoe.moe.expert_hidden) == (64, 8, 1024)
    ds = preset("deepseek-moe-16b").model.moe
    assert ds.num_shared_experts == 2 and ds.first_k_dense == 1
    assert preset("olmo-1b").model.moe is None


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny\nmodel:\n  d_model: 64\n  moe:\n    top_k: 1\nsteps: 7\n")
    cfg = load(str(path), ["--model.moe.num_experts", "16", "--optim.lr=1e-4",
                           "--data.paths", "a,b", "--model.qk_norm", "false"])
    assert cfg.model.d_model == 64 and cfg.model.moe.top_k == 1 and cfg.steps == 7
    assert cfg.model.moe.num_experts == 16 and cfg.optim.lr == 1e-4
    assert cfg.data.paths == ["a", "b"] and cfg.model.qk_norm is False
    assert cfg.model.num_layers == preset("tiny").model.num_layers  # rest of the preset kept


def test_dense_override():
    cfg = load(None, ["--model.moe", "null"], preset_name="tiny")
    assert cfg.model.moe is None


@pytest.mark.parametrize("overrides, message", [
    (["--model.moe.top_k", "9"], "model.moe.top_k (9) must be between 1 and model.moe.num_experts (8)"),
    (["--parallel.tp", "3"], "model.num_heads (4) must be divisible by parallel.tp (3)"),
    (["--model.d_moel", "3"], "unknown config key 'model.d_moel'"),
    (["--model.d_model", "abc"], "model.d_model: expected int, got 'abc'"),
    (["--model.moe.router_mode", "foo"], "model.moe.router_mode must be"),
    (["--optim.schedule", "exp"], "optim.schedule must be"),
    (["--steps"], "override '--steps' needs a value"),
])
def test_bad_values_give_one_line_error(overrides, message):
    with pytest.raises(ValueError) as err:
        load(None, overrides, preset_name="tiny")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_world_size_checks():
    cfg = preset("tiny")
    cfg.parallel.ep, cfg.micro_batch_size = 4, 4
    with pytest.raises(ValueError, match="parallel.ep\\*etp \\(4\\) must divide dp\\*tp \\(2\\)"):
        validate(cfg, world_size=2)
    validate(cfg, world_size=4)


# Published sizes: (total, active) in billions, to the digits the model cards / papers give.
PUBLISHED = {
    "olmoe-1b-7b": (6.92, 1.28),        # OLMoE paper / allenai/OLMoE-1B-7B-0924
    "mixtral-8x7b": (46.7, 12.9),       # Mixtral of Experts paper
    "deepseek-moe-16b": (16.4, 2.8),    # DeepSeekMoE paper / deepseek-moe-16b-base
    "olmo-1b": (1.18, 1.18),            # OLMo paper (dense: all active)
}


def meta_model(cfg):
    """The full-size model on the meta device: shapes only, no memory, well under a second."""
    import torch

    from megamoe.model.transformer import Transformer
    with torch.device("meta"):
        return Transformer(cfg.model)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_have_the_published_sizes(name):
    cfg = preset(name)
    validate(cfg)
    model = meta_model(cfg)
    total, active = PUBLISHED[name]
    digits = len(str(total).split(".")[1])
    assert round(model.num_params() / 1e9, digits) == total
    digits = len(str(active).split(".")[1])
    assert round(model.num_params(active=True) / 1e9, digits) == active


def test_olmo_1b_ties_embeddings_and_has_non_parametric_norms():
    m = preset("olmo-1b").model
    assert m.tie_embeddings and m.norm == "layernorm" and not m.norm_affine and m.seq_length == 2048
    model = meta_model(preset("olmo-1b"))
    assert model.lm_head.weight is model.embed.weight
    names = [n for n, _ in model.named_parameters()]
    assert not any("norm" in n for n in names), [n for n in names if "norm" in n]
    # Untied and with norm weights it is the 1.28B the preset used to have: one more
    # vocab x d_model matrix, plus the scales of the 33 norms (2 per layer + the final one).
    untied = preset("olmo-1b")
    untied.model.tie_embeddings, untied.model.norm_affine = False, True
    untied_total = meta_model(untied).num_params()
    assert untied_total - model.num_params() == 50304 * 2048 + (2 * 16 + 1) * 2048
    assert round(untied_total / 1e9, 2) == 1.28


def test_preset_norm_eps_and_context_as_published():
    assert preset("deepseek-moe-16b").model.norm_eps == 1e-6     # rms_norm_eps
    assert preset("olmoe-1b-7b").model.norm_eps == 1e-5
    assert preset("mixtral-8x7b").model.norm_eps == 1e-5
    assert preset("mixtral-8x7b").model.rope_theta == 1e6


def test_non_parametric_norms_refuse_qk_norm_and_apex():
    for overrides in (["--model.qk_norm", "true"], ["--model.norm_impl", "apex"]):
        with pytest.raises(ValueError, match="model.norm_affine false does not combine with model.qk_norm"):
            load(None, ["--model.norm_affine", "false", *overrides], preset_name="olmo-1b")
