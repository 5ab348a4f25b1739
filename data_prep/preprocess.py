"""Preprocessing presets and the MONAI transform chain applied once to every case.

Chain: RAS orientation -> crop to the body (foreground) -> intensity: CT window scaled to
[0, 1], or MR percentile clip + z-score with the body's mean and standard deviation ->
resampling to the preset spacing (image bilinear, label nearest). Intensities are set on the
file's own grid, as nnU-Net does, so that voxels interpolated across the body's edge do not
enter the MR statistics (after resampling 5 mm slices they doubled a small body's spread).

The body is CT voxels above ``body_threshold_hu``; in MR, whose units are arbitrary, voxels
above ``mr_body_fraction`` of the robust intensity range (2nd to 98th percentile), the
threshold FSL's BET uses to find a head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from data_prep.errors import DataPrepError

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
    mr_percentiles: tuple[float, float] = (0.5, 99.5)  # MR clip, before the z-score
    mr_body_fraction: float = 0.1  # MR body: above this fraction of the robust range
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


class CTBody:
    """Picklable CT body selector (Ray ships transforms to workers): voxels above a HU value.
    An image with no such voxel is refused: cropping it would leave an empty volume."""

    def __init__(self, threshold_hu: float):
        self.threshold_hu = threshold_hu

    def __call__(self, x):
        body = x > self.threshold_hu
        if not body.any():
            raise ValueError(
                f"no voxel above the body threshold of {self.threshold_hu:g} HU (the image "
                f"ranges {float(x.min()):g}..{float(x.max()):g}): is it a CT in Hounsfield units?"
            )
        return body


class MRBody:
    """Picklable MR body selector: voxels above ``fraction`` of the robust range (2nd to 98th
    percentile) of the image it is given."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def threshold(self, x) -> float:
        lo, hi = np.percentile(np.asarray(x, dtype=np.float32), [2.0, 98.0])
        return float(lo + self.fraction * (hi - lo))

    def __call__(self, x):
        return x > self.threshold(x)


class ZScoreInBodyd:
    """z-score ``key`` with the mean and standard deviation of its body voxels (``select_fn``);
    every voxel is shifted and scaled alike, so air stays below tissue."""

    def __init__(self, key: str, select_fn):
        self.key = key
        self.select_fn = select_fn

    def __call__(self, data: dict) -> dict:
        image = data[self.key]
        body = self.select_fn(image)
        values = image[body]
        std = float(values.std()) if values.numel() > 1 else 0.0
        if std == 0.0:
            value = float(values.flatten()[0]) if values.numel() else float(image.flatten()[0])
            raise ValueError(
                f"the image is constant inside the body ({values.numel()} voxels of value "
                f"{value:g}): nothing to normalise; is it a mask rather than an image?"
            )
        out = dict(data)
        out[self.key] = (image - values.mean()) / std
        return out


def body_mask(image: np.ndarray, modality: str, preset: Preset) -> np.ndarray:
    """The voxels the preset calls body (foreground crop, MR statistics) in a raw image."""
    if modality == "CT":
        return CTBody(preset.body_threshold_hu)(image)
    return MRBody(preset.mr_body_fraction)(image)


def check_modality(preset: Preset, modality: str, *, dataset: str, path: str) -> None:
    """A CT preset applies a Hounsfield window: refuse it on an MR dataset, and the reverse."""
    if preset.modality is not None and preset.modality != modality:
        fitting = ", ".join(n for n, p in PRESETS.items() if p.modality in (None, modality))
        raise DataPrepError(
            f"preset '{preset.name}' is for {preset.modality}, but dataset '{dataset}' declares "
            f"{modality}: choose a preset for {modality} ({fitting}; auto follows each "
            "dataset's modality)",
            path=path,
        )


def build_transforms(preset: Preset, modality: str, with_label: bool) -> Compose:
    from monai.transforms import (
        ClipIntensityPercentilesd,
        Compose,
        CropForegroundd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    if modality == "CT":
        body = CTBody(preset.body_threshold_hu)
    else:
        body = MRBody(preset.mr_body_fraction)
    steps = [
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        CropForegroundd(
            keys=keys,
            source_key="image",
            select_fn=body,
            margin=preset.crop_margin,
            allow_smaller=True,
        ),
    ]
    if modality == "CT":
        lo, hi = preset.ct_window
        steps.append(
            ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
        )
    else:
        lo, hi = preset.mr_percentiles
        steps += [
            ClipIntensityPercentilesd(keys="image", lower=lo, upper=hi),
            ZScoreInBodyd("image", body),
        ]
    steps.append(Spacingd(keys=keys, pixdim=preset.spacing, mode=modes, dtype=np.float32))
    return Compose(steps)


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain: MONAI wraps a transform's own error in
    ``RuntimeError("applying transform <object repr>")``, which says nothing to a person."""
    seen = {id(err)}
    while True:
        # the chain Python itself prints: the explicit cause, else an unsuppressed context
        nxt = (
            err.__cause__
            if err.__cause__ is not None
            else (None if err.__suppress_context__ else err.__context__)
        )
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


class TransformError(Exception):
    """A preprocessing step failed: its class name and the underlying cause's own message."""

    def __init__(self, step: object, err: BaseException):
        cause = root_cause(err)
        self.step = type(step).__name__
        self.cause = f"{type(cause).__name__}: {cause}"
        super().__init__(f"preprocessing step {self.step} failed: {self.cause}")


def apply_steps(chain: Compose, data: dict) -> dict:
    """Run a chain step by step, so that a failure is a ``TransformError`` naming its step."""
    for step in chain.transforms:
        try:
            data = step(data)
        except Exception as err:
            raise TransformError(step, err) from err
    return data


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
    A failing step raises ``TransformError`` naming it.
    """
    import torch
    from monai.data import MetaTensor

    modality = preset.modality or modality
    data = {"image": MetaTensor(torch.from_numpy(image)[None], affine=torch.as_tensor(affine))}
    if label is not None:
        data["label"] = MetaTensor(
            torch.from_numpy(label.astype(np.float32))[None], affine=torch.as_tensor(affine)
        )
    data = apply_steps(build_transforms(preset, modality, label is not None), data)
    new_image = data["image"][0].numpy().astype(np.float32, copy=False)
    new_label = None
    if label is not None:
        new_label = np.rint(data["label"][0].numpy()).astype(np.uint8)
    new_affine = np.asarray(data["image"].affine, dtype=np.float64)
    return np.ascontiguousarray(new_image), new_label, new_affine
