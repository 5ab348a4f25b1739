"""Augmentation of fine-tuning patches (``AugmentConfig``): a small rotation and scaling about
the patch centre (linear for the image, nearest for the label, edge voxels repeated past the
border) and an intensity scale and shift. No flips: mirrored, the liver and the spleen swap
sides. Every draw comes from the case's random stream, so a seed gives the same patches."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from data_prep.phantom import random_rotation

if TYPE_CHECKING:
    from mixcl_ray.config import AugmentConfig


def augment_patches(
    images: np.ndarray, labels: np.ndarray, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Augmented copies of (n, X, Y, Z) float32 image and uint8 label patches."""
    count = len(images)
    if aug.moves:
        centre = (np.asarray(images.shape[1:], dtype=np.float64) - 1) / 2
        moved_images, moved_labels = np.empty_like(images), np.empty_like(labels)
        for k in range(count):
            # output voxel o samples the input at matrix @ o + offset: the centre stays put
            matrix = random_rotation(rng, aug.rotate_deg) / rng.uniform(1 - aug.zoom, 1 + aug.zoom)
            offset = centre - matrix @ centre
            ndimage.affine_transform(
                images[k], matrix, offset, output=moved_images[k], order=1, mode="nearest"
            )
            ndimage.affine_transform(
                labels[k], matrix, offset, output=moved_labels[k], order=0, mode="nearest"
            )
        images, labels = moved_images, moved_labels
    shape = (count, 1, 1, 1)
    scale = rng.uniform(1 - aug.intensity_scale, 1 + aug.intensity_scale, shape)
    shift = rng.uniform(-aug.intensity_shift, aug.intensity_shift, shape)
    return (images * scale + shift).astype(np.float32), labels
