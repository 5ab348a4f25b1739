"""The training stages' settings (patches, optimiser, scaling; pre-training and fine-tuning)
and their presets.

Presets:
- ``cpu-tiny`` (default): 32^3 patches, UNet 8-64, a few epochs; minutes on two CPU cores.
- ``paper``: 96^3 patches, UNet 16-256, GPU workers with bf16 autocast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mixcl_ray.config.base import _check, load_yaml, merge
from mixcl_ray.config.core import LossConfig, ModelConfig
from mixcl_ray.config.parts import (
    AugmentConfig,
    OptimConfig,
    PatchConfig,
    ScalingSettings,
)
from mixcl_ray.data.corruptions import CorruptionConfig
from mixcl_ray.data.views import ViewConfig


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    corruptions: CorruptionConfig = field(default_factory=CorruptionConfig)
    patches: PatchConfig = field(default_factory=PatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    preset: str = "cpu-tiny"  # the preset these settings started from (recorded with runs)
    pretrain_label_fraction: float = 1.0  # of the labelled pre-training cases whose labels are used
    target_images: bool = True  # the target task's training images join as unlabelled cases

    def __post_init__(self):
        _check(0 <= self.pretrain_label_fraction <= 1, "pretrain_label_fraction must be in [0, 1]")
        _check(
            self.views.crop_offset < min(self.patches.patch_size),
            f"views.crop_offset ({self.views.crop_offset}) must be below the patch side "
            f"({min(self.patches.patch_size)}): the two views have to overlap",
        )


@dataclass(frozen=True)
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    patches: PatchConfig = field(default_factory=lambda: PatchConfig(patches_per_case=16))
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(epochs=10, lr=2e-3, warmup_epochs=0.5)
    )
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    preset: str = "cpu-tiny"  # the preset these settings started from (recorded with runs)
    # share of the target's labelled training cases (a subset in splits.json)
    label_fraction: float = 1.0
    # which of splits.json's seeded nested label subsets the fraction is drawn from
    label_subset: int = 0
    source: str | None = None  # target source; None: the manifest's target_source
    # the encoder only by default: with the pre-trained decoder loaded as well, every pre-trained
    # start fine-tuned worse on the built-in benchmark
    load_decoder: bool = False
    # learning rate of the pre-trained (loaded) parameters as a multiple of optim.lr; 1: every
    # parameter alike. A fresh decoder's first gradients otherwise reshape the pre-trained
    # encoder at the full rate. No effect on a run from scratch (nothing loaded) unless
    # scale_scratch
    pretrained_lr_scale: float = 1.0
    # a control: a run from scratch trains the parts it would have loaded (the encoder, with
    # load_decoder the decoder too) at pretrained_lr_scale as well. Does a pre-trained encoder
    # help, or only a slower one?
    scale_scratch: bool = False
    # small label fractions repeat their cases up to this many patches an epoch; "full": up to
    # what all the source's labelled training cases make, the same number of steps at every
    # label fraction
    min_patches_per_epoch: int | str = 64
    val_every: int = 1  # epochs between validations (the last epoch always validates)
    sw_batch_size: int = 4  # sliding-window inference: windows per forward pass
    sw_overlap: float = 0.25  # sliding-window inference: overlap of neighbouring windows
    # augmentation of the training patches (docs/method.md, fine-tuning protocol)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # the parts fine-tuning loads (pretrained_parts) learn at rate 0 for this many epochs while
    # the fresh decoder and head learn, in a run from scratch too (the control)
    encoder_hold_epochs: float = 1.0
    # the loaded parts' rate then rises linearly to its full value over this many epochs
    encoder_ramp_epochs: float = 1.0
    # the weights validated and kept are an exponential moving average of the trained ones,
    # updated every step with this decay; 0: the trained weights themselves
    ema_decay: float = 0.99
    # which validated weights become the model: "last" (the last epoch's) or "best" (the best
    # validation Dice of the run: on a small validation set, the height of a noisy peak)
    selection: str = "last"

    @property
    def pretrained_parts(self) -> tuple[str, ...]:
        """The backbone parts fine-tuning loads from pre-trained weights."""
        return ("encoder", "decoder") if self.load_decoder else ("encoder",)

    def scaled_parts(self, pretrained: bool) -> tuple[str, ...]:
        """The backbone parts that train at ``pretrained_lr_scale``: the loaded ones; in a run
        from scratch (``pretrained`` false), none unless ``scale_scratch``."""
        return self.pretrained_parts if pretrained or self.scale_scratch else ()

    def __post_init__(self):
        _check(
            0 < self.label_fraction <= 1,
            f"label_fraction must be in (0, 1], got {self.label_fraction}",
        )
        _check(
            isinstance(self.label_subset, int) and self.label_subset >= 0,
            f"label_subset must be a whole number >= 0, got {self.label_subset!r}",
        )
        _check(
            self.val_every > 0 and 0 <= self.sw_overlap < 1,
            "val_every must be > 0 and sw_overlap in [0, 1)",
        )
        m = self.min_patches_per_epoch
        _check(
            m == "full" or (isinstance(m, int) and not isinstance(m, bool) and m > 0),
            f"min_patches_per_epoch must be a positive integer or 'full', got {m!r}",
        )
        _check(
            self.pretrained_lr_scale > 0,
            f"pretrained_lr_scale must be > 0, got {self.pretrained_lr_scale}",
        )
        _check(
            self.encoder_hold_epochs >= 0 and self.encoder_ramp_epochs >= 0,
            "encoder_hold_epochs and encoder_ramp_epochs must be >= 0",
        )
        _check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(
            self.selection in ("last", "best"),
            f"selection must be 'last' or 'best', got {self.selection!r}",
        )


PAPER_MODEL = ModelConfig(features=(16, 32, 64, 128, 256, 16), global_dim=128, dense_dim=64)
# a shuffle buffer of 8 (first batch after 14 patches) instead of 32 (after 50): on an H200,
# 0.92x (UNet) and 0.90x (SwinUNETR) the plain MONAI loop's patches/s instead of 0.77x / 0.80x
PAPER_PATCHES = PatchConfig(
    patch_size=(96, 96, 96),
    patches_per_case=4,
    batch_size=2,
    cpus_per_data_task=1.0,
    shuffle_buffer=8,
)
PAPER_SCALING = ScalingSettings(workers=1, use_gpu=True)

PRESETS = {
    "cpu-tiny": {"pretrain": PretrainConfig(), "finetune": FinetuneConfig()},
    "paper": {
        "pretrain": PretrainConfig(
            model=PAPER_MODEL,
            patches=PAPER_PATCHES,
            scaling=PAPER_SCALING,
            preset="paper",
            optim=OptimConfig(epochs=100, lr=1e-4, warmup_epochs=5),
        ),
        "finetune": FinetuneConfig(
            model=PAPER_MODEL,
            patches=PAPER_PATCHES,
            scaling=PAPER_SCALING,
            preset="paper",
            optim=OptimConfig(epochs=200, lr=1e-4, warmup_epochs=5),
            min_patches_per_epoch=32,
        ),
    },
}


def load_config(
    stage: str,
    preset: str = "cpu-tiny",
    path: str | os.PathLike | None = None,
    overrides: dict | None = None,
):
    """The preset of a stage ("pretrain" | "finetune"), with a YAML file and overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset][stage]
    if path is not None:
        try:
            data = load_yaml(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"{path}: cannot read the config file: {err}") from None
        config = merge(config, data, str(path))
    if overrides:
        config = merge(config, overrides)
    return config
