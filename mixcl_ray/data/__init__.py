"""Patches, views and corruptions: pure numpy/torch functions (the Ray Data wiring is thin)."""

from mixcl_ray.data.corruptions import CorruptionConfig, corrupt
from mixcl_ray.data.pairs import make_pretrain_example
from mixcl_ray.data.patches import sample_patches
from mixcl_ray.data.views import ViewConfig, apply_spatial, invert_spatial

__all__ = [
    "CorruptionConfig",
    "ViewConfig",
    "apply_spatial",
    "corrupt",
    "invert_spatial",
    "make_pretrain_example",
    "sample_patches",
]
