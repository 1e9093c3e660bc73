"""Config <-> dicts, YAML files and dotted command-line overrides, with one-line errors."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from megamoe.config.checks import validate
from megamoe.config.presets import preset
from megamoe.config.schema import TrainConfig

# ------------------------------------------------------------------------------ dict <-> dataclass

def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> tuple[bool, Any]:
    """(True, cls) if `tp` is a dataclass type or Optional[dataclass]."""
    if dataclasses.is_dataclass(tp):
        return True, tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return True, arg
    return False, None


def _coerce(value, tp, where: str):
    """Convert a YAML / command-line value to the annotated type, or raise a one-line error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls, data: dict, base=None, where: str = ""):
    """Build `cls` from a (partial) dict on top of `base` (defaults if None)."""
    obj = base if base is not None else cls()
    hints = _hints(cls)
    for key, value in (data or {}).items():
        path = f"{where}{key}"
        if key not in hints:
            known = ", ".join(hints)
            raise ValueError(f"unknown config key {path!r}; known keys here: {known}")
        is_dc, sub_cls = _is_dataclass_type(hints[key])
        if is_dc and (isinstance(value, dict)):
            current = getattr(obj, key)
            setattr(obj, key, from_dict(sub_cls, value, current if current is not None else sub_cls(),
                                        f"{path}."))
        elif is_dc and value is None:
            setattr(obj, key, None)
        else:
            setattr(obj, key, _coerce(value, hints[key], path))
    return obj


def apply_override(cfg: TrainConfig, dotted: str, value: str) -> None:
    """Set ``cfg.<dotted>`` from a command-line string (``model.moe.num_experts`` -> 16)."""
    parts = dotted.split(".")
    nested: dict = {}
    cursor = nested
    for p in parts[:-1]:
        cursor[p] = {}
        cursor = cursor[p]
    cursor[parts[-1]] = yaml.safe_load(value) if value not in ("",) else ""
    # YAML turns "1e-3" into a string and "3,4" into a string: both are coerced by type below.
    from_dict(TrainConfig, nested, base=cfg)


def load(path: str | None = None, overrides: list[str] | None = None,
         preset_name: str | None = None) -> TrainConfig:
    """Preset -> YAML file -> dotted overrides (``["--model.d_model", "256", ...]``)."""
    data: dict = {}
    if path:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {path!r} not found") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping at top level")
    name = preset_name or data.pop("preset", None)
    data.pop("preset", None)
    cfg = preset(name) if name else TrainConfig()
    cfg = from_dict(TrainConfig, data, base=cfg)
    for key, value in parse_overrides(overrides or []):
        apply_override(cfg, key, value)
    validate(cfg)
    return cfg


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``--a.b 3 --c=4`` -> [("a.b", "3"), ("c", "4")]."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}; overrides look like --model.d_model 256")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"override {arg!r} needs a value")
            value = argv[i + 1]
            i += 2
        out.append((key, value))
    return out
