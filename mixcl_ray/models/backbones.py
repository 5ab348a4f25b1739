"""3D encoder-decoders with the encoder under ``.encoder`` and the decoder under ``.decoder``.

Both return two feature maps: the bottleneck (for the global head) and the last decoder level
(for the dense and reconstruction heads, and for segmentation); ``forward_levels`` adds the
encoder's five levels, finest first (for the dense head on the encoder, ``dense_source``).
The UNet is assembled from MONAI's BasicUNet blocks and the SwinUNETR from MONAI's SwinUNETR
modules; only their grouping changes, so that weights load by the prefixes ``encoder.`` and
``decoder.``.
"""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet, SwinUNETR
from torch import nn

from mixcl_ray.config import ModelConfig

# bottleneck, last decoder level (None without decoding), the encoder's levels finest first
Levels = tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]


class UNetBackbone(nn.Module):
    """MONAI BasicUNet without its final 1x1x1 conv. Input sides must be multiples of 16."""

    divisor = 16
    min_side = 16

    def __init__(self, config: ModelConfig):
        super().__init__()
        net = BasicUNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=1,
            features=config.features,
            dropout=config.dropout,
        )
        self.encoder = nn.ModuleDict(
            {k: getattr(net, k) for k in ("conv_0", "down_1", "down_2", "down_3", "down_4")}
        )
        self.decoder = nn.ModuleDict(
            {k: getattr(net, k) for k in ("upcat_4", "upcat_3", "upcat_2", "upcat_1")}
        )
        self.bottleneck_channels = config.features[4]
        self.decoder_channels = config.features[5]
        self.encoder_channels = tuple(config.features[:5])

    def forward(
        self, x: torch.Tensor, decode: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, C, D, H, W) -> bottleneck (B, F4, D/16, H/16, W/16), decoder (B, F5, D, H, W)
        (None when ``decode`` is False: the identity head alone needs no decoder)."""
        return self.forward_levels(x, decode)[:2]

    def forward_levels(self, x: torch.Tensor, decode: bool = True) -> Levels:
        """``forward``'s two maps and the encoder's five levels (F0 at D ... F4 at D/16)."""
        e = self.encoder
        x0 = e["conv_0"](x)
        x1 = e["down_1"](x0)
        x2 = e["down_2"](x1)
        x3 = e["down_3"](x2)
        x4 = e["down_4"](x3)
        levels = (x0, x1, x2, x3, x4)
        if not decode:
            return x4, None, levels
        d = self.decoder
        u = d["upcat_4"](x4, x3)
        u = d["upcat_3"](u, x2)
        u = d["upcat_2"](u, x1)
        u = d["upcat_1"](u, x0)
        return x4, u, levels


class SwinBackbone(nn.Module):
    """MONAI SwinUNETR without its output conv. Input sides: multiples of 32, at least 64 (its
    bottleneck instance norm needs more than one voxel)."""

    divisor = 32
    min_side = 64
    _encoder_keys = ("swinViT", "encoder1", "encoder2", "encoder3", "encoder4", "encoder10")
    _decoder_keys = ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1")

    def __init__(self, config: ModelConfig):
        super().__init__()
        net = SwinUNETR(
            in_channels=config.in_channels,
            out_channels=1,
            feature_size=config.feature_size,
            drop_rate=config.dropout,
        )
        self.normalize = net.normalize
        self.encoder = nn.ModuleDict({k: getattr(net, k) for k in self._encoder_keys})
        self.decoder = nn.ModuleDict({k: getattr(net, k) for k in self._decoder_keys})
        self.bottleneck_channels = 16 * config.feature_size
        self.decoder_channels = config.feature_size
        f = config.feature_size
        self.encoder_channels = (f, f, 2 * f, 4 * f, 16 * f)

    def forward(
        self, x: torch.Tensor, decode: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, C, D, H, W) -> bottleneck (B, 16F, D/32, ...), decoder (B, F, D, H, W) or None."""
        return self.forward_levels(x, decode)[:2]

    def forward_levels(self, x: torch.Tensor, decode: bool = True) -> Levels:
        """``forward``'s two maps and the encoder's five levels (F at D, F at D/2, 2F at D/4,
        4F at D/8, 16F at D/32)."""
        e, d = self.encoder, self.decoder
        hidden = e["swinViT"](x, self.normalize)
        enc0 = e["encoder1"](x)
        enc1 = e["encoder2"](hidden[0])
        enc2 = e["encoder3"](hidden[1])
        enc3 = e["encoder4"](hidden[2])
        bottleneck = e["encoder10"](hidden[4])
        levels = (enc0, enc1, enc2, enc3, bottleneck)
        if not decode:
            return bottleneck, None, levels
        u = d["decoder5"](bottleneck, hidden[3])
        u = d["decoder4"](u, enc3)
        u = d["decoder3"](u, enc2)
        u = d["decoder2"](u, enc1)
        u = d["decoder1"](u, enc0)
        return bottleneck, u, levels


def build_backbone(config: ModelConfig) -> UNetBackbone | SwinBackbone:
    """The encoder-decoder that ``config.backbone`` names."""
    return (UNetBackbone if config.backbone == "unet" else SwinBackbone)(config)


def check_patch_size(config: ModelConfig, patch_size: tuple[int, ...]) -> None:
    """Refuse a patch size the configured backbone cannot take (without building it)."""
    backbone = UNetBackbone if config.backbone == "unet" else SwinBackbone
    bad = [s for s in patch_size if s % backbone.divisor or s < backbone.min_side]
    if bad:
        raise ValueError(
            f"patch size {tuple(patch_size)} does not suit {backbone.__name__}: every side "
            f"must be a multiple of {backbone.divisor} and at least {backbone.min_side}"
        )
