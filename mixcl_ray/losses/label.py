"""Label consistency: supervised contrast over sampled voxel embeddings of labelled patches.

Our reconstruction of MixCL's label term (the paper is public only as an abstract), after
SupCon (Khosla et al., 2020) applied to voxels. With N sampled voxel embeddings e (from both
views, many patches and source datasets), normalised, s_ia = e_i . e_a / tau:

    L = mean over anchors i of  -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )

P(i): other voxels of the same organ class (across views, patches and sources).
A(i): P(i) plus the voxels *known* to be of another class.

Partial labels. A source annotates some classes only; its background voxel may be an organ it
does not label. So:
- a foreground voxel of class c and one of class c' != c are negatives of each other;
- a background voxel is a negative of class c only if its own source annotates c (then it is
  certainly not c); otherwise the pair is left out of the denominator (never a false negative);
- background voxels are never anchors and never positives of each other: "not any of my
  source's organs" is not one class across sources;
- unlabelled patches (label 255) contribute nothing: they are never sampled.
Anchors are foreground voxels with at least one positive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixcl_ray.losses.precision import upcast

UNLABELLED = 255


def known_pairs(labels: torch.Tensor, annotated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and known-negative pair masks.

    labels: (N,) class ids, 0 = background; annotated: (N, K) bool, annotated[n, c] = the source
    of voxel n labels class c. Returns positives (N, N) and negatives (N, N) bool masks.
    """
    n = labels.shape[0]
    fg = labels > 0
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(n, dtype=torch.bool, device=labels.device)
    positives = fg[:, None] & fg[None, :] & same & ~eye
    both_fg_diff = fg[:, None] & fg[None, :] & ~same
    # anchor i foreground of class c, candidate a background whose source annotates c
    clamp = labels.clamp(max=annotated.shape[1] - 1)
    a_excludes_i = annotated[:, clamp].T  # [i, a] = annotated[a, labels[i]]
    bg_known = fg[:, None] & ~fg[None, :] & a_excludes_i
    negatives = both_fg_diff | bg_known
    return positives, negatives


class LabelConsistencyLoss(nn.Module):
    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor
    ) -> torch.Tensor:
        return self.loss_and_floor(embeddings, labels, annotated)[0]

    def loss_and_floor(
        self, embeddings: torch.Tensor, labels: torch.Tensor, annotated: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """embeddings: (N, E) voxel embeddings; labels: (N,) class ids (0 = background);
        annotated: (N, K) bool, the classes each voxel's source annotates.

        Returns the loss and its floor (see ``label_floor``, from the same pair masks); the loss
        is 0 (with a gradient path) and the floor None when no anchor has a positive.
        """
        if (
            embeddings.ndim != 2
            or labels.shape != embeddings.shape[:1]
            or annotated.shape[0] != labels.shape[0]
        ):
            raise ValueError(
                f"expected embeddings (N, E), labels (N,), annotated (N, K); got {tuple(embeddings.shape)}, "
                f"{tuple(labels.shape)}, {tuple(annotated.shape)}"
            )
        positives, negatives = known_pairs(labels, annotated.bool())
        anchors = positives.any(dim=1)
        if not anchors.any():
            return embeddings.sum() * 0.0, None
        e = F.normalize(upcast(embeddings), dim=1)
        logits = e @ e.T / self.temperature  # (N, N)
        denominator = (positives | negatives)[anchors]
        log_den = torch.logsumexp(
            logits[anchors].masked_fill(~denominator, float("-inf")), dim=1
        )  # (M,)
        pos = positives[anchors].float()
        log_prob = logits[anchors] - log_den[:, None]
        per_anchor = -(log_prob * pos).sum(dim=1) / pos.sum(dim=1)
        return per_anchor.mean(), _floor(positives)


def label_floor(labels: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor | None:
    """The lowest value ``LabelConsistencyLoss`` can take on these voxels: the mean over anchors
    of log |P(i)|, reached when every anchor's positives are equally close to it and its
    negatives infinitely far. It grows with the voxels sampled per class, so the loss alone
    does not say how far from solved the term is; the loss minus this floor does (0: solved).
    None when no anchor has a positive (the loss is then 0)."""
    return _floor(known_pairs(labels, annotated.bool())[0])


def _floor(positives: torch.Tensor) -> torch.Tensor | None:
    counts = positives.sum(dim=1)
    counts = counts[counts > 0]
    return torch.log(counts.float()).mean() if counts.numel() else None


def sample_voxels(
    voxel_embeddings: tuple[torch.Tensor, ...],
    labels: torch.Tensor | tuple[torch.Tensor, ...],
    annotated: torch.Tensor,
    voxels_per_class: int,
    background_voxels: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-balanced voxel sampling, the same locations in every view.

    voxel_embeddings: V tensors (B, E, D, H, W), aligned voxel for voxel; labels: (B, D, H, W)
    with 255 for unlabelled patches; annotated: (B, K) bool per patch. At most
    ``voxels_per_class`` locations per foreground class and ``background_voxels`` background
    locations are drawn over the whole batch (never all voxels). Returns embeddings (V*M, E),
    labels (V*M,), annotated (V*M, K).

    Views cropped at different places (``ViewConfig.crop_offset``) are not aligned: ``labels`` is
    then a tuple of V label tensors, one per view, and each view's locations are drawn from
    its own, with the same caps.
    """
    if isinstance(labels, tuple | list):
        parts = [
            sample_voxels((v,), lab, annotated, voxels_per_class, background_voxels, generator)
            for v, lab in zip(voxel_embeddings, labels, strict=True)
        ]
        return tuple(torch.cat(part) for part in zip(*parts, strict=True))
    b, e = voxel_embeddings[0].shape[:2]
    flat_labels = labels.reshape(-1)  # (B*D*H*W,)
    chosen = []
    for cls in torch.unique(flat_labels).tolist():
        if cls == UNLABELLED:
            continue
        cap = background_voxels if cls == 0 else voxels_per_class
        if cap == 0:
            continue
        idx = torch.nonzero(flat_labels == cls).squeeze(1)
        if idx.numel() > cap:
            perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[:cap].to(
                idx.device
            )
            idx = idx[perm]
        chosen.append(idx)
    if not chosen:
        empty = voxel_embeddings[0].new_zeros((0, e))
        return (
            empty,
            labels.new_zeros((0,), dtype=torch.long),
            annotated.new_zeros((0, annotated.shape[1])),
        )
    idx = torch.cat(chosen)  # (M,) flat indices into (B, D, H, W)
    spatial = labels[0].numel()
    batch_idx = idx // spatial
    voxel_idx = idx % spatial
    sampled = [v.reshape(b, e, -1)[batch_idx, :, voxel_idx] for v in voxel_embeddings]  # V x (M, E)
    n_views = len(voxel_embeddings)
    return (
        torch.cat(sampled),
        flat_labels[idx].long().repeat(n_views),
        annotated[batch_idx].repeat(n_views, 1),
    )
