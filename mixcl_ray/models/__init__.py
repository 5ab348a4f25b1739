"""Networks: pure PyTorch/MONAI (no Ray, no MLflow, no file formats beyond torch.save)."""

from mixcl_ray.models.backbones import SwinBackbone, UNetBackbone, build_backbone, check_patch_size
from mixcl_ray.models.mixcl import MixCLModel, SegmentationNet
from mixcl_ray.models.transfer import (
    LoadReport,
    load_pretrained,
    pretrained_state,
    save_pretrained,
    unwrap,
)

__all__ = [
    "LoadReport",
    "MixCLModel",
    "SegmentationNet",
    "SwinBackbone",
    "UNetBackbone",
    "build_backbone",
    "check_patch_size",
    "load_pretrained",
    "pretrained_state",
    "save_pretrained",
    "unwrap",
]
