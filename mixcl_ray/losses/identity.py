"""Identity consistency: NT-Xent / InfoNCE over the global embeddings of two views.

Our reconstruction of MixCL's identity term (the paper, arXiv 2203.02114, is public only as an
abstract), as in SimCLR (Chen et al., 2020):

    z = normalise([z1; z2])                      (2B, G)
    s_ij = z_i . z_j / tau
    L = 1/2B sum_i -log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) )

with p(i) the other view of the same patch (i + B mod 2B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixcl_ray.losses.precision import upcast


class IdentityConsistencyLoss(nn.Module):
    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """z1, z2: (B, G) global embeddings of view 1 and view 2 of the same B patches."""
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(
                f"expected two (B, G) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
            )
        if z1.shape[0] < 2:
            raise ValueError("identity consistency needs at least 2 patches per batch (negatives)")
        b = z1.shape[0]
        z = F.normalize(upcast(torch.cat([z1, z2])), dim=1)  # (2B, G)
        logits = z @ z.T / self.temperature  # (2B, 2B)
        logits = logits.masked_fill(
            torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf")
        )
        targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
        return F.cross_entropy(logits, targets)
