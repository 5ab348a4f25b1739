"""Preprocessing presets and the MONAI transform chain applied once to every case.

Chain: RAS orientation -> resampling to the preset spacing (image bilinear, label nearest)
-> crop to the body (foreground) -> intensity: CT window scaled to [0, 1], or MR percentile
clip + z-score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from monai.transforms import Compose

# torch and MONAI are imported where a case is transformed: the presets are read by every
# ``python -m data_prep`` command (``--help`` included), and ``import monai`` alone takes
# about 3.5 s (MONAI imports all of its submodules)

DEFAULT_SPACING = (1.5, 1.5, 2.0)


@dataclass(frozen=True)
class Preset:
    """How a case is resampled and normalised. ``modality=None`` follows the dataset."""

    name: str
    modality: str | None = None
    spacing: tuple[float, float, float] = DEFAULT_SPACING
    ct_window: tuple[float, float] = (-175.0, 250.0)  # HU, scaled to [0, 1]
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    body_threshold_hu: float = -500.0  # CT voxels above this are body (foreground crop)
    crop_margin: int = 2  # voxels kept around the body

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "auto": Preset("auto"),
    "spleen": Preset("spleen", "CT", ct_window=(-57.0, 164.0)),
    "btcv": Preset("btcv", "CT", ct_window=(-175.0, 250.0)),
    "ct": Preset("ct", "CT"),
    "mr": Preset("mr", "MR"),
}


def get_preset(name: str, spacing: tuple[float, float, float] | None = None) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    if spacing is not None:
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (mm), got {spacing}")
        preset = Preset(**{**preset.as_dict(), "spacing": tuple(float(s) for s in spacing)})
    return preset


class _Above:
    """Picklable foreground selector (Ray ships transforms to workers)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, x):
        return x > self.threshold


def build_transforms(preset: Preset, modality: str, with_label: bool) -> Compose:
    from monai.transforms import (
        Compose,
        CropForegroundd,
        NormalizeIntensityd,
        Orientationd,
        ScaleIntensityRanged,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    steps = [
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=preset.spacing, mode=modes, dtype=np.float32),
    ]
    if modality == "CT":
        lo, hi = preset.ct_window
        steps += [
            CropForegroundd(
                keys=keys,
                source_key="image",
                select_fn=_Above(preset.body_threshold_hu),
                margin=preset.crop_margin,
                allow_smaller=True,
            ),
            ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        ]
    else:
        lo, hi = preset.mr_percentiles
        steps += [
            CropForegroundd(
                keys=keys,
                source_key="image",
                select_fn=_Above(0.0),
                margin=preset.crop_margin,
                allow_smaller=True,
            ),
            ScaleIntensityRangePercentilesd(
                keys="image", lower=lo, upper=hi, b_min=None, b_max=None, clip=True
            ),
            NormalizeIntensityd(keys="image", nonzero=True),
        ]
    return Compose(steps)


def preprocess_arrays(
    image: np.ndarray,
    affine: np.ndarray,
    label: np.ndarray | None,
    preset: Preset,
    modality: str,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Apply the preset to one case.

    image: (X, Y, Z) float32 in scanner units; label: (X, Y, Z) uint8 or None.
    Returns image (X', Y', Z') float32, label (X', Y', Z') uint8 or None, and the new affine.
    """
    import torch
    from monai.data import MetaTensor

    modality = preset.modality or modality
    data = {"image": MetaTensor(torch.from_numpy(image)[None], affine=torch.as_tensor(affine))}
    if label is not None:
        data["label"] = MetaTensor(
            torch.from_numpy(label.astype(np.float32))[None], affine=torch.as_tensor(affine)
        )
    out = build_transforms(preset, modality, label is not None)(data)
    new_image = out["image"][0].numpy().astype(np.float32, copy=False)
    new_label = None
    if label is not None:
        new_label = np.rint(out["label"][0].numpy()).astype(np.uint8)
    new_affine = np.asarray(out["image"].affine, dtype=np.float64)
    return np.ascontiguousarray(new_image), new_label, new_affine
