"""MixCL losses, one per module: pure PyTorch, tensors in and out."""

from mixcl_ray.losses.identity import IdentityConsistencyLoss
from mixcl_ray.losses.label import LabelConsistencyLoss, known_pairs, label_floor, sample_voxels
from mixcl_ray.losses.mixcl import MixCLLoss, NonFiniteLossError, view_outputs
from mixcl_ray.losses.reconstruction import ReconstructionConsistencyLoss

__all__ = [
    "IdentityConsistencyLoss",
    "LabelConsistencyLoss",
    "MixCLLoss",
    "NonFiniteLossError",
    "ReconstructionConsistencyLoss",
    "known_pairs",
    "label_floor",
    "sample_voxels",
    "view_outputs",
]
