"""The MixCL core's settings: the network and the loss, and the named methods (which loss
terms pre-train)."""

from __future__ import annotations

from dataclasses import dataclass

from mixcl_ray.config.base import _check

BACKBONES = ("unet", "swinunetr")
DENSE_SOURCES = ("decoder", "encoder")


@dataclass(frozen=True)
class ModelConfig:
    """Encoder-decoder and heads.

    ``features``: the six channel counts of the UNet (four encoder levels + bottleneck + last
    decoder level), as MONAI's BasicUNet takes them. ``feature_size``: SwinUNETR's width.
    """

    backbone: str = "unet"  # unet (MONAI BasicUNet) | swinunetr
    in_channels: int = 1  # image channels
    # the UNet's channels: 4 encoder levels, bottleneck, last decoder level
    features: tuple[int, ...] = (8, 16, 32, 48, 64, 16)
    feature_size: int = 12  # SwinUNETR's width (a multiple of 12)
    global_dim: int = 64  # identity embedding size
    global_hidden: int = 128  # hidden width of the identity head
    dense_dim: int = 32  # voxel embedding size
    # where the voxel embeddings of the label term come from: "decoder" (its last level) or
    # "encoder" (all five encoder levels, each projected and upsampled to the patch, summed):
    # fine-tuning loads the encoder only, so "encoder" puts the label term on what is kept
    dense_source: str = "decoder"
    dropout: float = 0.0  # dropout in the backbone

    def __post_init__(self):
        _check(
            self.backbone in BACKBONES,
            f"backbone must be one of {BACKBONES}, got {self.backbone!r}",
        )
        _check(
            len(self.features) == 6 and min(self.features) > 0,
            f"features must be 6 positive channel counts, got {self.features}",
        )
        _check(
            self.feature_size > 0 and self.feature_size % 12 == 0,
            f"feature_size must be a positive multiple of 12 (SwinUNETR), got {self.feature_size}",
        )
        _check(
            self.in_channels > 0 and self.global_dim > 0 and self.dense_dim > 0,
            "in_channels, global_dim and dense_dim must be positive",
        )
        _check(
            self.dense_source in DENSE_SOURCES,
            f"dense_source must be one of {DENSE_SOURCES}, got {self.dense_source!r}",
        )
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class LossConfig:
    """Weights and temperatures of the MixCL loss; a zero weight switches a term off."""

    l_id: float = 1.0  # identity consistency weight; 0 switches the term off
    l_label: float = 1.0  # label consistency weight
    l_rec: float = 1.0  # reconstruction consistency weight
    temperature_id: float = 0.1  # the identity term's softmax temperature
    gather_negatives: bool = False  # identity negatives from every worker's batch, not its own
    temperature_label: float = 0.1  # the label term's softmax temperature
    reconstruction: str = "l1"  # "l1" | "mse"
    voxels_per_class: int = 64  # cap of sampled voxels per class and batch (both views)
    background_voxels: int = 128  # cap of sampled background voxels per batch

    def __post_init__(self):
        for name in ("l_id", "l_label", "l_rec"):
            value = getattr(self, name)
            _check(value >= 0, f"{name} must be >= 0, got {value}")
        for name in ("temperature_id", "temperature_label"):
            value = getattr(self, name)
            _check(value > 0, f"{name} must be > 0, got {value}")
        _check(
            self.reconstruction in ("l1", "mse"),
            f"reconstruction must be 'l1' or 'mse', got {self.reconstruction!r}",
        )
        _check(
            self.voxels_per_class > 0 and self.background_voxels >= 0,
            "voxels_per_class must be > 0 and background_voxels >= 0",
        )


# The baselines are settings of the same code: (l_id, l_label, l_rec); scratch skips pre-training.
# MixCL keeps its three terms together, as the paper describes it (docs/method.md).
METHODS: dict[str, tuple[float, float, float] | None] = {
    "scratch": None,
    "identity": (1.0, 0.0, 0.0),
    "reconstruction": (0.0, 0.0, 1.0),
    "label": (0.0, 1.0, 0.0),
    "mixcl": (1.0, 1.0, 1.0),
}


def method_weights(method: str) -> dict | None:
    """The loss weights {l_id, l_label, l_rec} of a named method (None: scratch)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if METHODS[method] is None:
        return None
    l_id, l_label, l_rec = METHODS[method]
    return {"l_id": l_id, "l_label": l_label, "l_rec": l_rec}


def loss_config_for(method: str, **overrides) -> LossConfig | None:
    """The loss settings of a named method (None for scratch: no pre-training)."""
    weights = method_weights(method)
    return None if weights is None else LossConfig(**{**weights, **overrides})
