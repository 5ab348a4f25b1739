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

import numpy as np
import yaml

from mixcl_ray.config.base import _check, load_yaml, merge
from mixcl_ray.config.core import LossConfig, ModelConfig
from mixcl_ray.data.corruptions import CorruptionConfig
from mixcl_ray.data.views import ViewConfig


@dataclass(frozen=True)
class PatchConfig:
    patch_size: tuple[int, int, int] = (32, 32, 32)  # voxels per side
    patches_per_case: int = 8  # per case and epoch
    pos: float = 1.0  # foreground : background patch centres, as RandCropByPosNegLabeld
    neg: float = 1.0  # the background share of patch centres (see pos)
    batch_size: int = 4  # per worker
    # decode the volumes once into the object store (True), read and decode them every epoch
    # (False, memory bounded whatever the corpus), or "auto": cache when the decoded cases fill
    # at most CACHE_SHARE of the cluster's object store
    cache_cases: bool | str = "auto"
    # patches mixed across cases before batching; 0: none. Each epoch's first batch waits until
    # the buffer holds 1.5x this many patches plus a batch (Ray Data's shuffling batcher)
    shuffle_buffer: int = 32
    # the same batches in the same order in every run of a seed: Ray Data hands the blocks over
    # in order (and splits them between workers the same way) and the shuffle buffer is seeded
    # per epoch and worker; false lets the first finished data task's patches go first
    deterministic: bool = True
    cpus_per_data_task: float = 0.5  # CPUs each Ray Data sampling task reserves
    # the feed's object-store budget in MiB (Ray Data's limit for the blocks it holds while it
    # runs); 0: Ray Data's own, half the object store. A streamed corpus otherwise fills up to
    # that half with blocks in flight, which shows as memory growing with the corpus
    object_store_mb: int = 0

    def __post_init__(self):
        _check(
            len(self.patch_size) == 3 and min(self.patch_size) > 0,
            f"patch_size must be 3 positive sides, got {self.patch_size}",
        )
        _check(
            self.patches_per_case > 0 and self.batch_size > 0,
            "patches_per_case and batch_size must be > 0",
        )
        _check(
            self.pos >= 0 and self.neg >= 0 and self.pos + self.neg > 0,
            "pos/neg must be >= 0, not both 0",
        )
        _check(self.cpus_per_data_task > 0, "cpus_per_data_task must be > 0")
        _check(
            isinstance(self.object_store_mb, int) and self.object_store_mb >= 0,
            f"object_store_mb must be a whole number of MiB >= 0, got {self.object_store_mb!r}",
        )
        _check(self.shuffle_buffer >= 0, f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        _check(
            isinstance(self.deterministic, bool),
            f"deterministic must be true or false, got {self.deterministic!r}",
        )
        _check(
            self.cache_cases in (True, False, "auto"),
            f"cache_cases must be true, false or auto, got {self.cache_cases!r}",
        )

    @property
    def local_shuffle_buffer(self) -> int | None:
        """Ray Data's local_shuffle_buffer_size: None turns the shuffling batcher off."""
        return self.shuffle_buffer or None

    def shuffle_seed(self, seed: int, epoch: int, rank: int) -> int | None:
        """Ray Data's local_shuffle_seed for one epoch of one worker (None: unseeded)."""
        if not self.deterministic or not self.shuffle_buffer:
            return None
        return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 4  # passes over the feed
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 1e-5  # AdamW's weight decay
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0 (per step)
    grad_clip: float = 1.0  # max gradient norm; 0 switches clipping off
    seed: int = 0  # seeds the weights, the patches and the shuffle

    def __post_init__(self):
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0")
        _check(
            self.warmup_epochs >= 0 and self.grad_clip >= 0,
            "warmup_epochs and grad_clip must be >= 0",
        )


@dataclass(frozen=True)
class ScalingSettings:
    workers: int = 2  # Ray Train workers (DDP)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float | None = None  # None: 1 with a GPU, else half the CPUs shared by workers
    amp: str = "bf16"  # autocast dtype on GPU: bf16 | fp16 | none (always fp32 on CPU)
    max_failures: int = 2  # worker-group restarts from the last checkpoint
    placement_strategy: str = "PACK"  # PACK: fill nodes in turn; SPREAD: one worker per node

    def __post_init__(self):
        _check(self.workers > 0, f"workers must be > 0, got {self.workers}")
        _check(
            self.amp in ("bf16", "fp16", "none"),
            f"amp must be bf16, fp16 or none, got {self.amp!r}",
        )
        _check(
            self.cpus_per_worker is None or self.cpus_per_worker > 0, "cpus_per_worker must be > 0"
        )
        _check(
            self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
            f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got "
            f"{self.placement_strategy!r}",
        )


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
class AugmentConfig:
    """What fine-tuning does to every training patch, every method alike: changes anatomy
    allows. No flips: mirrored, the liver and the spleen swap sides."""

    intensity_scale: float = 0.1  # the image times U(1 - s, 1 + s)
    intensity_shift: float = 0.1  # then plus U(-s, s), in normalised intensity units
    rotate_deg: float = 10.0  # a rotation about each axis of up to this many degrees
    zoom: float = 0.1  # an isotropic scaling by U(1 - z, 1 + z)

    def __post_init__(self):
        _check(
            min(self.intensity_scale, self.intensity_shift, self.rotate_deg, self.zoom) >= 0
            and self.intensity_scale < 1
            and self.zoom < 1,
            "augment: every setting must be >= 0, intensity_scale and zoom < 1",
        )

    @property
    def moves(self) -> bool:
        """Whether patches are resampled (rotated or scaled) at all."""
        return self.rotate_deg > 0 or self.zoom > 0


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
