"""The MixCL model: backbone + global projection + dense voxel projection + reconstruction."""

from __future__ import annotations

import torch
from torch import nn

from mixcl_ray.config import ModelConfig
from mixcl_ray.models.backbones import build_backbone

HEADS = ("global", "dense", "reconstruction")


class GlobalProjectionHead(nn.Module):
    """Pooled bottleneck features -> MLP -> identity embedding (B, global_dim)."""

    def __init__(self, in_channels: int, hidden: int, out_dim: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(bottleneck).flatten(1))  # (B, C, d, h, w) -> (B, C) -> (B, out)


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
        self.dense_head = DenseProjectionHead(self.backbone.decoder_channels, config.dense_dim)
        self.reconstruction_head = nn.Conv3d(self.backbone.decoder_channels, config.in_channels, 1)

    def forward(self, x: torch.Tensor, heads: tuple[str, ...] = HEADS) -> dict[str, torch.Tensor]:
        """x: (B, C, D, H, W). Returns those of ``global_embedding`` (B, G), ``voxel_embeddings``
        (B, E, D, H, W) and ``reconstruction`` (B, C, D, H, W) that ``heads`` asks for."""
        unknown = set(heads) - set(HEADS)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; known: {HEADS}")
        bottleneck, features = self.backbone(x, decode=bool(set(heads) - {"global"}))
        out = {}
        if "global" in heads:
            out["global_embedding"] = self.global_head(bottleneck)
        if "dense" in heads:
            out["voxel_embeddings"] = self.dense_head(features)
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
