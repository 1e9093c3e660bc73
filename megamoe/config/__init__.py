"""Typed configuration: dataclasses, presets, YAML files and dotted command-line overrides.

A run is described by one `TrainConfig` holding the sections below. Load order:
preset (``preset: tiny`` in YAML or ``--preset``) -> YAML file -> ``--section.field value`` overrides.
`validate()` checks the whole thing and raises `ValueError` with one line saying what is wrong.

Modules: schema.py (the dataclasses), presets.py (published architectures), files.py (dicts,
YAML, overrides, load), checks.py (validate). Import from here.
"""

from megamoe.config.checks import validate
from megamoe.config.files import apply_override, from_dict, load, parse_overrides, to_dict
from megamoe.config.presets import PRESETS, preset
from megamoe.config.schema import (DataConfig, ModelConfig, MoEConfig, OptimConfig, ParallelConfig,
                                   RopeScaling, TrainConfig)

__all__ = ["DataConfig", "ModelConfig", "MoEConfig", "OptimConfig", "ParallelConfig", "RopeScaling",
           "TrainConfig", "PRESETS", "preset", "load", "from_dict", "to_dict", "apply_override",
           "parse_overrides", "validate"]
