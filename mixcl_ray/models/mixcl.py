"""The MixCL model: backbone + global projection + dense voxel projection + reconstruction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mixcl_ray.config import ModelConfig
from mixcl_ray.data.views import invert_spatial, unwarp
from mixcl_ray.models.backbones import build_backbone

HEADS = ("global", "dense", "reconstruction")


class GlobalProjectionHead(nn.Module):
    """Pooled bottleneck features -> MLP -> identity embedding (B, global_dim).

    The bottleneck is instance-normalised, so a global average over it is nearly the same for
    every patch (each channel's mean is normalised away) and the identity term cannot learn;
    pooling to a 2x2x2 grid and flattening keeps the coarse layout that tells patches apart.
    """

    grid = 2

    def __init__(self, in_channels: int, hidden: int, out_dim: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool3d(self.grid)
        in_channels = in_channels * self.grid**3
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(bottleneck).flatten(1))  # (B, C, d, h, w) -> (B, 8C) -> (B, out)


class DenseProjectionHead(nn.Module):
    """Last decoder features -> two 1x1x1 convs -> voxel embeddings (B, dense_dim, D, H, W)."""

    def __init__(self, in_channels: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, in_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(in_channels, out_dim, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class EncoderDenseHead(nn.Module):
    """Encoder levels -> voxel embeddings (B, dense_dim, D, H, W), as a feature pyramid's top-down
    sum: each level through its own 1x1x1 conv to ``width`` channels, upsampled (trilinear) to
    the patch and summed, then ReLU and a 1x1x1 conv. The label term's gradient then reaches
    every encoder level directly, not through a decoder that fine-tuning does not load."""

    def __init__(self, in_channels: tuple[int, ...], out_dim: int, width: int = 32):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv3d(c, width, 1) for c in in_channels)
        self.out = nn.Sequential(nn.ReLU(inplace=True), nn.Conv3d(width, out_dim, 1))

    def forward(self, levels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        size = levels[0].shape[2:]
        total = self.lateral[0](levels[0])
        for conv, level in zip(self.lateral[1:], levels[1:], strict=True):
            total = total + F.interpolate(
                conv(level), size=size, mode="trilinear", align_corners=False
            )
        return self.out(total)


class MixCLModel(nn.Module):
    """Backbone with the three pre-training heads; ``forward`` returns a dict of named outputs.

    ``backbone.encoder`` and ``backbone.decoder`` are what fine-tuning loads.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.global_head = GlobalProjectionHead(
            self.backbone.bottleneck_channels, config.global_hidden, config.global_dim
        )
        self.dense_head = (
            EncoderDenseHead(self.backbone.encoder_channels, config.dense_dim)
            if config.dense_source == "encoder"
            else DenseProjectionHead(self.backbone.decoder_channels, config.dense_dim)
        )
        self.reconstruction_head = nn.Conv3d(self.backbone.decoder_channels, config.in_channels, 1)

    def forward(
        self,
        x: torch.Tensor,
        heads: tuple[str, ...] = HEADS,
        flips: torch.Tensor | None = None,
        rots: torch.Tensor | None = None,
        warps: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """x: (B, C, D, H, W). Returns those of ``global_embedding`` (B, G), ``voxel_embeddings``
        (B, E, D, H, W) and ``reconstruction`` (B, C, D, H, W) that ``heads`` asks for.

        With the view's spatial transform (``flips`` (B, 3), ``rots`` (B,), see
        ``mixcl_ray.data.views``), the bottleneck grid and the voxel embeddings are mapped back
        to the patch's own frame, so that both views of a patch line up; the reconstruction
        stays in the view's frame, like its target. With ``warps`` (B, 3, 3) as well, the voxel
        embeddings are then resampled onto the patch's grid (``unwarp``) and ``voxel_valid``
        (B, D, H, W) says which patch voxels the view saw; the bottleneck grid, a few voxels
        wide, is left as it is under a small rotation or scale.
        """
        unknown = set(heads) - set(HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; known: {HEADS}")
        from_encoder = self.config.dense_source == "encoder"
        decoded = {"reconstruction"} if from_encoder else {"dense", "reconstruction"}
        bottleneck, features, levels = self.backbone.forward_levels(
            x, decode=bool(decoded & set(heads))
        )
        out = {}
        if "global" in heads:
            if flips is not None:
                bottleneck = invert_spatial(bottleneck, flips, rots)
            out["global_embedding"] = self.global_head(bottleneck)
        if "dense" in heads:
            embeddings = self.dense_head(levels if from_encoder else features)
            if flips is not None:
                embeddings = invert_spatial(embeddings, flips, rots)
            if warps is not None:
                embeddings, out["voxel_valid"] = unwarp(embeddings, warps)
            out["voxel_embeddings"] = embeddings
        if "reconstruction" in heads:
            out["reconstruction"] = self.reconstruction_head(features)
        return out


class SegmentationNet(nn.Module):
    """Backbone + 1x1x1 classifier: (B, C, D, H, W) -> logits (B, num_classes, D, H, W)."""

    def __init__(self, config: ModelConfig, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + organs), got {num_classes}")
        self.config = config
        self.backbone = build_backbone(config)
        self.classifier = nn.Conv3d(self.backbone.decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x)[1])
