"""One pre-training example: two views of a patch, each possibly corrupted, with what is needed
to map their voxel embeddings back onto the patch's own frame."""

from __future__ import annotations

import numpy as np

from mixcl_ray.data.corruptions import CorruptionConfig, corrupt
from mixcl_ray.data.views import (
    ViewConfig,
    apply_spatial,
    apply_warp,
    augment_intensity,
    random_spatial,
    random_warp,
)

DEFAULT_VIEWS = ViewConfig()
DEFAULT_CORRUPTIONS = CorruptionConfig()
GEOMETRY = ("flips1", "flips2", "rot1", "rot2", "label")
WARPS = ("warp1", "warp2")  # with ViewConfig.warps


def restored_views(l_id: float, l_label: float, l_rec: float) -> int:
    """How many views' corrupted inputs the reconstruction head restores, as
    ``mixcl_ray.losses.mixcl.view_outputs`` reads a batch: 0 without the term, 1 when a
    contrastive term runs as well (MixCL: the contrastive heads see the clean views), 2 when it
    runs alone."""
    if l_rec <= 0:
        return 0
    return 1 if l_id > 0 or l_label > 0 else 2


def example_keys(
    restored: int, cropped_apart: bool = False, warped: bool = False
) -> tuple[str, ...]:
    """The arrays a training step reads when ``restored`` views are restored: the network's
    inputs, the reconstruction targets and the views' geometry (with ``label2`` when the second
    view is cropped elsewhere, ``ViewConfig.crop_offset``, and ``warp1``/``warp2`` when the views
    are warped, ``ViewConfig.warps``). Without reconstruction the inputs are the clean views
    themselves (no ``clean*``); MixCL needs no second corrupted input."""
    images = {
        0: ("input1", "input2"),
        1: ("clean1", "clean2", "input1"),
        2: ("clean1", "clean2", "input1", "input2"),
    }[restored]
    return images + GEOMETRY + (("label2",) if cropped_apart else ()) + (WARPS if warped else ())


def make_pretrain_example(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    views: ViewConfig = DEFAULT_VIEWS,
    corruptions: CorruptionConfig | None = DEFAULT_CORRUPTIONS,
    restored: int = 2,
    second: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """image: (X, Y, Z) float32 patch; label: (X, Y, Z) uint8 (255 = unlabelled); ``second``:
    the (image, label) patch of the second view when it is cropped elsewhere (None: both views
    of ``image``).

    Returns clean1/clean2 (1, X, Y, Z): the two views (the reconstruction targets);
    input1/input2 (1, X, Y, Z): the network inputs, the views corrupted when ``corruptions`` is
    given, only the first ``restored`` of them (the others are the clean views, not copied);
    flips1/flips2 (3,) bool and rot1/rot2 (): the spatial transform of each view (and
    warp1/warp2 (3, 3), applied before them, with ``views.warps``); label (X, Y, Z) in the
    first patch's frame (and label2 in the second's, with ``second``).
    """
    example: dict[str, np.ndarray] = {"label": label}
    patches = (image, image if second is None else second[0])
    if second is not None:
        example["label2"] = second[1]
    for index, v in enumerate(("1", "2")):
        patch = patches[index][None]  # (1, X, Y, Z)
        if views.warps:  # drawn only then: the other settings keep their random streams
            example[f"warp{v}"] = random_warp(rng, views)
            patch = apply_warp(patch, example[f"warp{v}"])
        flips, rot = random_spatial(rng, views)
        clean = augment_intensity(apply_spatial(patch, flips, rot), rng, views)
        example[f"clean{v}"] = clean
        restore = corruptions is not None and index < restored
        example[f"input{v}"] = corrupt(clean, rng, corruptions) if restore else clean
        example[f"flips{v}"] = flips
        example[f"rot{v}"] = np.int64(rot)
    return example


def loss_example(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    views: ViewConfig,
    corruptions: CorruptionConfig,
    loss,
    second: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """One example holding only the arrays a step of ``loss``'s terms reads (``loss``: a
    ``LossConfig``): corrupted views only where the reconstruction head restores them, clean
    views alone without that term; ``second`` as ``make_pretrain_example`` takes it."""
    restored = restored_views(loss.l_id, loss.l_label, loss.l_rec)
    example = make_pretrain_example(
        image, label, rng, views, corruptions if restored else None, restored, second
    )
    keys = example_keys(restored, second is not None, views.warps)
    return {k: example[k] for k in keys}
