"""Typed configuration, validated at construction: frozen dataclasses of frozen sections.

One way to load (``load_config``: a preset, a YAML file, overrides), merge (``merge``,
``deep_merge``), validate (each dataclass checks itself) and serialise (``to_dict``,
``from_dict``, which refuses unknown keys with their path). Configs travel to Ray workers as
the objects they are.
"""

from mixcl_ray.config.base import deep_merge, from_dict, load_yaml, merge, to_dict
from mixcl_ray.config.core import (
    BACKBONES,
    DENSE_SOURCES,
    METHODS,
    LossConfig,
    ModelConfig,
    loss_config_for,
    method_weights,
)
from mixcl_ray.config.parts import AugmentConfig, OptimConfig, PatchConfig, ScalingSettings
from mixcl_ray.config.stages import PRESETS, FinetuneConfig, PretrainConfig, load_config

__all__ = [
    "AugmentConfig",
    "BACKBONES",
    "DENSE_SOURCES",
    "METHODS",
    "PRESETS",
    "FinetuneConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PatchConfig",
    "PretrainConfig",
    "ScalingSettings",
    "deep_merge",
    "from_dict",
    "load_config",
    "load_yaml",
    "loss_config_for",
    "merge",
    "method_weights",
    "to_dict",
]
