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
