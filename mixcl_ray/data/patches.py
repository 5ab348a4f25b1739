"""Label-aware 3D patch sampling, as MONAI's RandCropByPosNegLabeld does it: a patch is centred
on a foreground voxel with probability ``pos / (pos + neg)`` and on a background voxel
otherwise; unlabelled cases (label 255 everywhere) get uniformly random centres. Volumes
smaller than the patch are padded (image with its minimum, label with background, or with 255
for unlabelled cases). Pure numpy; no per-voxel Python loops.
"""

from __future__ import annotations

import numpy as np

UNLABELLED = 255


def window_slices(
    shape: tuple[int, ...], centre: np.ndarray, size: tuple[int, int, int]
) -> tuple[slice, ...]:
    """The part of a ``shape`` volume that the ``size`` window centred on ``centre`` covers:
    moved inside the volume where it fits, cut at its far side where the volume is smaller."""
    shape_arr, size_arr = np.array(shape), np.array(size)
    start = np.clip(centre - size_arr // 2, 0, np.maximum(shape_arr - size_arr, 0))
    stop = np.minimum(start + size_arr, shape_arr)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))


def crop(
    volume: np.ndarray, centre: np.ndarray, size: tuple[int, int, int], fill: float
) -> np.ndarray:
    """The ``size`` window of a (X, Y, Z) volume centred on ``centre``, clipped inside the volume
    where it fits and padded with ``fill`` where the volume is smaller than the window."""
    window = volume[window_slices(volume.shape, centre, size)]
    if window.shape == tuple(size):
        return window
    pad = [(0, s - w) for s, w in zip(size, window.shape, strict=True)]
    return np.pad(window, pad, constant_values=fill)


def sample_centres(
    label: np.ndarray, n: int, pos: float, neg: float, rng: np.random.Generator
) -> np.ndarray:
    """n patch centres (n, 3) drawn from a (X, Y, Z) label volume."""
    if pos < 0 or neg < 0 or pos + neg == 0:
        raise ValueError(f"pos and neg must be >= 0 and not both 0, got {pos}, {neg}")
    flat = label.reshape(-1)
    labelled = flat[0] != UNLABELLED or (flat != UNLABELLED).any()
    if not labelled:
        return np.stack([rng.integers(0, s, size=n) for s in label.shape], axis=1)
    foreground = np.flatnonzero((flat > 0) & (flat != UNLABELLED))
    background = np.flatnonzero(flat == 0)
    want_pos = rng.random(n) < pos / (pos + neg)
    if foreground.size == 0:
        want_pos[:] = False
    if background.size == 0:
        want_pos[:] = True
    idx = np.where(
        want_pos,
        foreground[rng.integers(0, max(foreground.size, 1), size=n)] if foreground.size else 0,
        background[rng.integers(0, max(background.size, 1), size=n)] if background.size else 0,
    )
    return np.stack(np.unravel_index(idx, label.shape), axis=1)


def sample_patches(
    image: np.ndarray,
    label: np.ndarray,
    patch_size: tuple[int, int, int],
    n: int,
    rng: np.random.Generator,
    pos: float = 1.0,
    neg: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """n (image, label) patch pairs: images (n, X, Y, Z) float32, labels (n, X, Y, Z) uint8."""
    return crop_patches(image, label, sample_centres(label, n, pos, neg, rng), patch_size)


def offset_centres(centres: np.ndarray, offset: int, rng: np.random.Generator) -> np.ndarray:
    """``centres`` (n, 3) each moved by a uniform integer offset in [-offset, offset] per axis:
    where a second, overlapping view is cropped."""
    return centres + rng.integers(-offset, offset + 1, size=centres.shape)


def crop_patches(
    image: np.ndarray, label: np.ndarray, centres: np.ndarray, patch_size: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """The (image, label) patches at ``centres`` (n, 3), padded as ``sample_patches`` pads."""
    unlabelled = bool(label.reshape(-1)[0] == UNLABELLED and (label == UNLABELLED).all())
    # filled once and each window copied in: padding every patch (np.pad), stacking and casting
    # took a quarter of a 96^3 example's time on volumes smaller than the patch
    images = np.full((len(centres), *patch_size), image.min(), dtype=np.float32)
    labels = np.full((len(centres), *patch_size), UNLABELLED if unlabelled else 0, np.uint8)
    for i, centre in enumerate(centres):
        window = window_slices(image.shape, centre, patch_size)
        part = tuple(slice(0, w.stop - w.start) for w in window)
        images[(i, *part)] = image[window]
        labels[(i, *part)] = label[window]
    return images, labels
