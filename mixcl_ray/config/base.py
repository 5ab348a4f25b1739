"""How every config is read, checked, merged and written: YAML (``1e-3`` is a number), a
check that names the setting, ``to_dict``/``from_dict`` (nested, unknown keys refused with their
path), and a deep merge of overrides."""

from __future__ import annotations

import dataclasses
import functools
import re
import typing

import yaml


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; here it is the number people meant."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str):
    """Parse a config or space file; ``1e-3`` is a number, as in YAML 1.2 and JSON."""
    return yaml.load(text, Loader=_YamlLoader)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def to_dict(config) -> dict:
    """A config dataclass as a nested dict of plain values (MLflow params, JSON, YAML)."""
    return dataclasses.asdict(config)


@functools.cache
def _sections(cls) -> dict:
    """Field name -> its config dataclass, for the fields that are sections."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints.get(f.name))
    }


def from_dict(cls, data: dict, where: str = ""):
    """Rebuild ``cls`` from a (nested) dict, naming any unknown key with its path."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
    sections = _sections(cls)
    values = {}
    for name, value in data.items():
        if name in sections and isinstance(value, dict):
            values[name] = from_dict(sections[name], value, f"{where}.{name}")
        else:
            values[name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def deep_merge(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied, nested mappings merged key by key."""
    out = dict(base)
    for k, v in overrides.items():
        nested = isinstance(v, dict) and isinstance(base.get(k), dict)
        out[k] = deep_merge(base[k], v) if nested else v
    return out


def merge(config, overrides: dict, where: str = ""):
    """``config`` with a nested dict of overrides applied (unknown keys refused)."""
    return from_dict(
        type(config), deep_merge(to_dict(config), overrides), where or type(config).__name__
    )
