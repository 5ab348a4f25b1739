"""Ray Data feed of fine-tuning: the label fraction's cases (labels in the target's own class
indices) -> per-epoch random (image, label) patches -> workers, on the machinery of
``mixcl_ray.feed`` (decoding, caching, block order, per-case random streams)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from data_prep import locations
from data_prep.reader import read_manifest, read_splits
from data_prep.splits import fraction_key
from mixcl_ray.data.augment import augment_patches
from mixcl_ray.data.patches import crop_patches, sample_centres
from mixcl_ray.feed import (
    block_order,
    case_rng,
    decoded_cases,
    epoch_index,
    should_cache,
    single,
    target_source,
)

if TYPE_CHECKING:
    from mixcl_ray.config import AugmentConfig, FinetuneConfig, PatchConfig


def class_lookup(data_dir, source: str) -> tuple[np.ndarray, list[str]]:
    """Global class id -> the target's own class index (0 = background), and the class names."""
    manifest = read_manifest(data_dir)
    classes = manifest["sources"][source]["annotated_classes"]  # name -> global id
    names = ["background", *sorted(classes, key=classes.get)]
    lut = np.zeros(256, dtype=np.uint8)
    for local, name in enumerate(names[1:], start=1):
        lut[classes[name]] = local
    return lut, names


def _finetune_case(row: dict, lut: np.ndarray) -> dict:
    return {"case_id": row["case_id"], "image": row["image"], "label": lut[row["label"]]}


CHUNK = 8  # patches per output block: the consumer starts on a case's first patches early


def _segmentation_examples(
    batch: dict,
    p: PatchConfig,
    augment: AugmentConfig,
    seed: int,
    repeats: int,
    epoch_offset: int,
):
    """One case -> patches_per_case x repeats (image, label) patches, yielded in blocks of at
    most CHUNK so that Ray Data streams them: with a small label fraction there are only a
    few cases, and one large block per case kept the workers waiting for whole cases."""
    case_id = str(single(batch, "case_id"))
    rng = case_rng(seed, case_id, epoch_index() + epoch_offset)
    image, label = single(batch, "image"), single(batch, "label")
    # the centres at once: drawing them scans the whole label volume
    centres = sample_centres(label, p.patches_per_case * repeats, p.pos, p.neg, rng)
    for start in range(0, len(centres), CHUNK):
        images, labels = crop_patches(image, label, centres[start : start + CHUNK], p.patch_size)
        images, labels = augment_patches(images, labels, augment, rng)
        yield {"image": images[:, None], "label": labels[:, None]}


def finetune_case_ids(
    data_dir, label_fraction: float, source: str | None = None, subset: int = 0
) -> list[str]:
    """The training cases of a label fraction in nested subset ``subset``, exactly as
    splits.json lists them (subset 0: ``label_fractions``)."""
    source = target_source(data_dir, source)
    splits = read_splits(data_dir)["sources"][source]
    subsets = splits.get("label_subsets") or [splits["label_fractions"]]
    if not 0 <= subset < len(subsets):
        raise ValueError(
            f"label subset {subset} is not in {locations.describe(data_dir)}'s splits.json "
            f"(it has {len(subsets)}); prepare the data again with this version for more"
        )
    ids = subsets[subset].get(fraction_key(label_fraction))
    if ids is None:
        raise ValueError(
            f"label fraction {label_fraction} is not in splits.json; prepare with --label-fractions"
        )
    return ids


def finetune_epoch_size(data_dir, cfg) -> tuple[int, int]:
    """(patches per epoch, repeats of each case) of a fine-tuning (a ``FinetuneConfig``): the
    label fraction's cases x ``patches_per_case``, the cases repeated up to
    ``min_patches_per_epoch`` patches. "full": up to what fine-tuning on every labelled training
    case of the source takes, so that every label fraction gets the same number of steps."""
    source = target_source(data_dir, cfg.source)
    per_epoch = len(finetune_case_ids(data_dir, cfg.label_fraction, source, cfg.label_subset))
    per_epoch *= cfg.patches.patches_per_case
    floor = cfg.min_patches_per_epoch
    if floor == "full":
        floor = len(read_splits(data_dir)["sources"][source]["train"])
        floor *= cfg.patches.patches_per_case
    repeats = max(1, -(-floor // per_epoch))
    return per_epoch * repeats, repeats


def finetune_cases(data_dir, cfg: FinetuneConfig):
    """Ray Dataset of the label-fraction cases, labels in the target's class indices."""
    source = target_source(data_dir, cfg.source)
    lut, _ = class_lookup(data_dir, source)
    ids = finetune_case_ids(data_dir, cfg.label_fraction, source, cfg.label_subset)
    return decoded_cases(data_dir, ids, cfg.patches.cpus_per_data_task).map(
        partial(_finetune_case, lut=lut), num_cpus=cfg.patches.cpus_per_data_task
    )


def build_finetune_dataset(data_dir, cfg: FinetuneConfig, epoch_offset: int = 0):
    """The Ray Dataset of (image, label) patches of the label-fraction subset, one epoch."""
    ids = finetune_case_ids(data_dir, cfg.label_fraction, cfg.source, cfg.label_subset)
    _, repeats = finetune_epoch_size(data_dir, cfg)
    with block_order(cfg.patches.deterministic):
        ds = finetune_cases(data_dir, cfg)
        if should_cache(data_dir, ids, cfg.patches.cache_cases):
            ds = ds.materialize()
        return ds.map_batches(
            partial(
                _segmentation_examples,
                p=cfg.patches,
                augment=cfg.augment,
                seed=cfg.optim.seed,
                repeats=repeats,
                epoch_offset=epoch_offset,
            ),
            batch_size=1,
            num_cpus=cfg.patches.cpus_per_data_task,
        )
