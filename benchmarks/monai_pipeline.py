"""The standard MONAI pre-training pipeline the benchmarks compare against: the cases as MONAI
dict items, and the chain CacheDataset caches and DataLoader workers run (RandCropByPosNegLabeld,
then MixCL's two views made either by our augmentation functions or by MONAI's own transforms).
Shared by ``feed_vs_monai.py``, ``memory_scaling.py`` and ``gpu_pretrain.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TwoViews:
    """MONAI-style dict transform: one cropped patch -> our two-view example (same functions
    as the Ray feed, so both pipelines do the same augmentation work)."""

    def __init__(self, config: dict):
        from mixcl_ray.config import PretrainConfig, from_dict

        self.cfg = from_dict(PretrainConfig, config)

    def __call__(self, item: dict) -> dict:
        from mixcl_ray.data.pairs import loss_example

        rng = np.random.default_rng()
        image = np.asarray(item["image"])[0]
        label = np.asarray(item["label"])[0].astype(np.uint8)
        cfg = self.cfg  # the arrays our feed ships
        example = loss_example(image, label, rng, cfg.views, cfg.corruptions, cfg.loss)
        example["annotated"] = np.asarray(item["annotated"])
        return example


def monai_items(data: Path) -> list[dict]:
    """The pre-training cases as MONAI dict items (image, label, annotated classes), with the
    labels a pre-training run may use, as the Ray feed prepares them."""
    from data_prep.reader import load_case, read_manifest
    from mixcl_ray.feed import _pretrain_case, pretraining_cases

    ids, labelled = pretraining_cases(data, 1.0, True)
    classes = len(read_manifest(data)["class_map"])
    return [_pretrain_case(load_case(data, i), frozenset(labelled), classes) for i in ids]


class Geometry:
    """The views' spatial transforms (none: flips and rot90 are off in the default views) and
    the label and annotated arrays in the shapes our feed ships."""

    def __call__(self, item: dict) -> dict:
        out = {k: item[k] for k in ("clean1", "clean2", "input1")}
        out["label"] = np.asarray(item["label"])[0].astype(np.uint8)
        out["annotated"] = np.asarray(item["annotated"])
        for v in ("1", "2"):
            out[f"flips{v}"] = np.zeros(3, dtype=bool)
            out[f"rot{v}"] = np.int64(0)
        return out


def monai_views(size: int, config: dict) -> list:
    """MixCL's example written with MONAI's own transforms, as a MONAI user would: per view a
    random gamma (RandAdjustContrastd), scale, shift and Gaussian noise with the ranges of our
    views; the first view copied and corrupted Models-Genesis-style with MONAI's nearest
    transforms: a random intensity curve (RandHistogramShiftd), local shuffling of 64 small
    blocks (RandCoarseShuffled) and in- or out-painting with uniform noise (RandCoarseDropoutd,
    holes or their outside), with our probabilities and box sizes."""
    from monai.transforms import (
        CopyItemsd,
        Identityd,
        OneOf,
        RandAdjustContrastd,
        RandCoarseDropoutd,
        RandCoarseShuffled,
        RandGaussianNoised,
        RandHistogramShiftd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    from mixcl_ray.config import PretrainConfig, from_dict

    cfg = from_dict(PretrainConfig, config)
    v, c = cfg.views, cfg.corruptions
    if v.flip_prob or v.rotate or v.crop_offset or not (cfg.loss.l_rec and cfg.loss.l_id):
        raise ValueError("the MONAI-transform chain mirrors MixCL's default views only")

    def view(key: str) -> list:  # one instance per view: a dict transform draws once per call
        return [
            RandAdjustContrastd(key, prob=1.0, gamma=v.gamma),
            RandScaleIntensityd(key, factors=(v.scale[0] - 1, v.scale[1] - 1), prob=1.0),
            RandShiftIntensityd(key, offsets=v.shift, prob=1.0),
            RandGaussianNoised(key, prob=1.0, std=v.noise_std),
        ]

    block = max(1, int(c.shuffle_block_max * size))
    paint = c.paint_prob
    return [
        CopyItemsd("image", times=2, names=["clean1", "clean2"]),
        *view("clean1"),
        *view("clean2"),
        CopyItemsd("clean1", names=["input1"]),
        RandHistogramShiftd("input1", num_control_points=(4, 10), prob=c.nonlinear_prob),
        RandCoarseShuffled(
            "input1",
            holes=c.shuffle_blocks,
            spatial_size=max(1, int(0.3 * block)),
            max_spatial_size=block,
            prob=c.shuffle_prob,
        ),
        OneOf(
            [
                RandCoarseDropoutd(
                    "input1",
                    holes=1,
                    max_holes=5,
                    spatial_size=max(1, size // 6),
                    max_spatial_size=max(1, size // 3),
                    fill_value=(0.0, 1.0),
                    prob=1.0,
                ),
                RandCoarseDropoutd(
                    "input1",
                    holes=1,
                    max_holes=4,
                    spatial_size=max(1, size // 2),
                    max_spatial_size=max(1, 3 * size // 4),
                    dropout_holes=False,
                    fill_value=(0.0, 1.0),
                    prob=1.0,
                ),
                Identityd("input1"),
            ],
            weights=[paint * c.inpaint_rate, paint * (1 - c.inpaint_rate), 1 - paint],
        ),
        Geometry(),
    ]


def monai_transform(size: int, config: dict, num_samples: int, load=None, views: str = "ours"):
    """The standard MONAI pre-training chain: (an optional loader,) channel first, unlabelled
    voxels as background for the crop centres, padding of volumes smaller than a patch (as our
    sampler pads its crops), RandCropByPosNegLabeld, then the two views: ``views`` "ours", our
    augmentation functions (both pipelines do the same work), or "monai", MONAI's own
    transforms (``monai_views``). One flat Compose: CacheDataset caches everything before the
    crop (a nested Compose, or a callable that is not a MONAI Transform, counts as random and
    stops the caching there)."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        Lambdad,
        RandCropByPosNegLabeld,
        SpatialPadd,
    )

    from data_prep.reader import UNLABELLED

    return Compose(
        [
            *([load] if load is not None else []),
            EnsureChannelFirstd(["image", "label"], channel_dim="no_channel"),
            Lambdad("label", lambda x: np.where(np.asarray(x) == UNLABELLED, 0, x)),
            SpatialPadd(["image", "label"], spatial_size=(size,) * 3),
            RandCropByPosNegLabeld(
                ["image", "label"],
                label_key="label",
                spatial_size=(size,) * 3,
                pos=1,
                neg=1,
                num_samples=num_samples,
            ),
            *([TwoViews(config)] if views == "ours" else monai_views(size, config)),
        ]
    )
