"""Identity consistency: NT-Xent / InfoNCE over the global embeddings of two views.

Our reconstruction of MixCL's identity term (the paper, arXiv 2203.02114, is public only as an
abstract), as in SimCLR (Chen et al., 2020):

    z = normalise([z1; z2])                      (2B, G)
    s_ij = z_i . z_j / tau
    L = 1/2B sum_i -log( exp(s_{i,p(i)}) / sum_{k != i} exp(s_ik) )

with p(i) the other view of the same patch (i + B mod 2B).

With ``gather=True`` and a process group of several workers, each worker's anchors are compared
with every worker's embeddings (SimCLR's global batch): the candidates are the 2WB embeddings of
all W workers, gathered with gradients (``torch.distributed.nn.all_gather``), and the loss is
the mean over the local anchors. Averaged over the workers, as DDP averages the gradients, it is
the loss, and the gradient, of the whole batch on one worker. With one worker it is the above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixcl_ray.losses.precision import upcast


class IdentityConsistencyLoss(nn.Module):
    def __init__(self, temperature: float = 0.1, gather: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """z1, z2: (B, G) global embeddings of view 1 and view 2 of the same B patches."""
        if z1.shape != z2.shape or z1.ndim != 2:
            raise ValueError(
                f"expected two (B, G) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
            )
        if z1.shape[0] < 2:
            raise ValueError("identity consistency needs at least 2 patches per batch (negatives)")
        b = z1.shape[0]
        z1, z2 = F.normalize(upcast(z1), dim=1), F.normalize(upcast(z2), dim=1)
        rank, world = _group() if self.gather else (0, 1)
        z = torch.cat([z1, z2])  # (2B, G): the local anchors
        if world > 1:
            from torch.distributed.nn import all_gather

            candidates = torch.cat([*all_gather(z1), *all_gather(z2)])  # (2WB, G)
        else:
            candidates = z
        n = world * b  # views 1 of every worker, then views 2
        logits = z @ candidates.T / self.temperature  # (2B, 2WB)
        local = torch.arange(b, device=z.device) + rank * b  # this worker's rows among n
        own = torch.cat([local, local + n])  # each anchor's own column
        logits[torch.arange(2 * b, device=z.device), own] = float("-inf")
        targets = torch.cat([local + n, local])  # the other view of the same patch
        return F.cross_entropy(logits, targets)


def _group() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
