"""Reconstruction consistency: the reconstruction head restores the clean view from its
corrupted version (Models Genesis, Zhou et al., 2019):  L = mean |x_hat - x|  (or squared).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixcl_ray.losses.precision import upcast


class ReconstructionConsistencyLoss(nn.Module):
    def __init__(self, kind: str = "l1"):
        super().__init__()
        if kind not in ("l1", "mse"):
            raise ValueError(f"kind must be 'l1' or 'mse', got {kind!r}")
        self.kind = kind

    def forward(self, reconstruction: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
        """reconstruction, clean: (B, C, D, H, W)."""
        if reconstruction.shape != clean.shape:
            raise ValueError(f"shape {tuple(reconstruction.shape)} != clean {tuple(clean.shape)}")
        fn = F.l1_loss if self.kind == "l1" else F.mse_loss
        return fn(upcast(reconstruction), upcast(clean))
