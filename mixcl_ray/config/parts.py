"""The settings both training stages are built from: patches, optimiser, scaling, and the
fine-tuning patches' augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixcl_ray.config.base import _check


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
    # on CPU workers, the network's 3D weights in channels-last layout: oneDNN's convolutions
    # then ran a 32^3 UNet step 15-25 % faster on 2 cores (GPU workers keep the default layout)
    channels_last: bool = True

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
