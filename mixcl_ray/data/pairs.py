"""One pre-training example: two views of a patch, each possibly corrupted, with what is needed
to map their voxel embeddings back onto the patch's own frame."""

from __future__ import annotations

import numpy as np

from mixcl_ray.data.corruptions import CorruptionConfig, corrupt
from mixcl_ray.data.views import ViewConfig, apply_spatial, augment_intensity, random_spatial

DEFAULT_VIEWS = ViewConfig()
DEFAULT_CORRUPTIONS = CorruptionConfig()


def make_pretrain_example(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    views: ViewConfig = DEFAULT_VIEWS,
    corruptions: CorruptionConfig | None = DEFAULT_CORRUPTIONS,
) -> dict[str, np.ndarray]:
    """image: (X, Y, Z) float32 patch; label: (X, Y, Z) uint8 (255 = unlabelled).

    Returns input1/input2 (1, X, Y, Z): the network inputs (corrupted views when
    ``corruptions`` is given); clean1/clean2 (1, X, Y, Z): the views before corruption (the
    reconstruction targets); flips1/flips2 (3,) bool and rot1/rot2 (): the spatial transform of
    each view; label (X, Y, Z) in the patch's own frame.
    """
    example: dict[str, np.ndarray] = {"label": label}
    for v in ("1", "2"):
        flips, rot = random_spatial(rng, views)
        clean = augment_intensity(
            apply_spatial(image[None], flips, rot), rng, views
        )  # (1, X, Y, Z)
        example[f"clean{v}"] = clean
        example[f"input{v}"] = (
            corrupt(clean, rng, corruptions) if corruptions is not None else clean
        )
        example[f"flips{v}"] = flips
        example[f"rot{v}"] = np.int64(rot)
    return example
