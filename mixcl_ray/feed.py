"""Ray Data feed of the training stages: cases -> per-epoch random patches -> workers.

Deterministic work happens once (reading and decoding the cases, hiding labels that a run may
not use, optionally kept in the object store with ``materialize``); random patch sampling,
views and corruptions run per epoch in Ray Data tasks on any CPU of the cluster. The random
stream of a case in an epoch is seeded by (seed, case id, epoch), where the epoch is the
dataset's execution index (one execution per epoch) plus ``epoch_offset`` for resumed runs.
Pre-training's examples are built here, fine-tuning's in ``mixcl_ray.finetune_feed``.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from data_prep.reader import UNLABELLED, read_cases, read_manifest, read_splits
from data_prep.splits import fraction_key
from mixcl_ray.data.pairs import loss_example
from mixcl_ray.data.patches import crop_patches, offset_centres, sample_centres

if TYPE_CHECKING:
    from mixcl_ray.config import PretrainConfig

LIMITS_REFRESH_S = 0.05


def refresh_limits_often() -> None:
    """Make Ray Data re-read its CPU limits every 50 ms instead of every second.

    Ray Data 2.60 caches an execution's resource limits for 1 s. A new execution (we run one
    per epoch) starts with limits of zero CPUs, before its reservation arrives, and then runs
    one task at a time until the cache expires. Measured on 2 CPUs (32^3, 16 patches per
    case): 268 patches/s, the CPUs half idle; with a 50 ms refresh 580 patches/s, as with
    Ray Data's resource allocator switched off. It must run in the process that executes the
    dataset: the driver for ``iter_batches`` and Ray Train's split coordinator actor for
    training, so ``init_ray`` calls it and every worker process runs it at start
    (``mixcl_ray.ray_start.setup_worker``). A Ray version without the attribute is left alone."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return
    current = getattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S", None)
    if isinstance(current, int | float) and current > LIMITS_REFRESH_S:
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = LIMITS_REFRESH_S


def epoch_index() -> int:
    """How many times this dataset has been executed before (the epoch, within one ``fit``).

    Ray Data has no public API for it; its private ``_execution_idx`` is read, and a Ray that
    lacks it is an error, never a silent 0 (every epoch would draw the same patches).
    ``tests/test_ray_compat.py`` fails on such a Ray."""
    from ray.data.context import DataContext

    context = DataContext.get_current()
    if not hasattr(context, "_execution_idx"):
        import ray

        raise RuntimeError(
            f"ray {ray.__version__}'s DataContext has no _execution_idx: the feed cannot tell "
            "its epochs apart; use the ray version pyproject.toml pins"
        )
    return int(context._execution_idx)


def case_rng(seed: int, case_id: str, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(case_id.encode()), epoch])


def single(batch: dict, key: str):
    value = batch[key][0]
    return np.asarray(value) if not isinstance(value, str | bytes) else value


def target_source(data_dir, source: str | None = None) -> str:
    manifest = read_manifest(data_dir)
    source = source or manifest.get("target_source")
    if not source and len(manifest["sources"]) == 1:  # a single dataset is its own target
        source = next(iter(manifest["sources"]))
    if not source:
        raise ValueError(
            f"{data_dir} names no target source: pass --source (one of {sorted(manifest['sources'])})"
        )
    if source not in manifest["sources"]:
        raise ValueError(f"unknown source {source!r}; known: {sorted(manifest['sources'])}")
    return source


def pretraining_cases(
    data_dir, pretrain_label_fraction: float, target_images: bool
) -> tuple[list[str], set[str]]:
    """(all pre-training case ids, the ones whose labels are used).

    Labelled pre-training cases are the training cases of every source except the target, the
    nested ``pretrain_label_fraction`` subset of them keeping labels; the rest, the unlabelled
    pool and (with ``target_images``) the target's training images join without labels. The
    target's labels, validation and test cases are never seen.
    """
    manifest, splits = read_manifest(data_dir), read_splits(data_dir)
    target = manifest.get("target_source")
    labelled: set[str] = set()
    ids: set[str] = set(splits["unlabelled"])
    for name, src in splits["sources"].items():
        if name == target:
            if target_images:
                ids.update(src["train"])
            continue
        ids.update(src["train"])
        if pretrain_label_fraction > 0 and src["train"]:
            key = fraction_key(pretrain_label_fraction)
            chosen = src["label_fractions"].get(key)
            if chosen is None:
                k = max(1, round(pretrain_label_fraction * len(src["train"])))
                chosen = src["label_fractions"]["1"][:k]
            labelled.update(chosen)
    ids = {i for i in ids if i in manifest["cases"]}
    return sorted(ids), labelled & ids


def _annotated_vector(annotated: np.ndarray, num_classes: int) -> np.ndarray:
    vec = np.zeros(num_classes, dtype=bool)
    vec[np.asarray(annotated, dtype=np.int64)] = True
    return vec


def _pretrain_case(row: dict, labelled: frozenset, num_classes: int) -> dict:
    keep = row["labelled"] and row["case_id"] in labelled
    label = row["label"] if keep else np.full(row["image"].shape, UNLABELLED, np.uint8)
    return {
        "case_id": row["case_id"],
        "image": row["image"],
        "label": label,
        "annotated": _annotated_vector(row["annotated_classes"], num_classes)
        if keep
        else np.zeros(num_classes, bool),
    }


def _pretrain_examples(batch: dict, cfg: PretrainConfig, epoch_offset: int) -> dict:
    """One case -> patches_per_case two-view examples: the arrays of ``example_keys`` for the
    loss's terms (inputs, reconstruction targets, flips1/2, rot1/2, label) and annotated."""
    case_id = str(single(batch, "case_id"))
    rng = case_rng(cfg.optim.seed, case_id, epoch_index() + epoch_offset)
    p = cfg.patches
    image, label = single(batch, "image"), single(batch, "label")
    centres = sample_centres(label, p.patches_per_case, p.pos, p.neg, rng)
    images, labels = crop_patches(image, label, centres, p.patch_size)
    seconds = [None] * len(images)
    if cfg.views.crop_offset:  # the second views cropped at an offset
        moved = offset_centres(centres, cfg.views.crop_offset, rng)
        seconds = list(zip(*crop_patches(image, label, moved, p.patch_size), strict=True))
    # only what the step reads: MixCL's second corrupted view was made and shipped for nothing
    examples = [
        loss_example(img, lab, rng, cfg.views, cfg.corruptions, cfg.loss, second)
        for img, lab, second in zip(images, labels, seconds, strict=True)
    ]
    out = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    out["annotated"] = np.repeat(single(batch, "annotated")[None], len(examples), axis=0)
    return out


def spread_blocks(cases: int) -> int:
    """How many blocks (read tasks) at least to split the cases into: one block is one
    sampling task per epoch.

    A read of small Parquet shards fused them into one block, and then every case's patches of
    an epoch were sampled by a single task, one case after the other, whatever the number of
    CPUs (measured: 1 task for 58 cases). One block per case costs a task per case, which
    small patches do not repay, so: 4 blocks per cluster CPU, at most one per case."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    return max(1, min(cases, 4 * cpus))


def decoded_cases(data_dir, ids, cpus: float):
    """The decoded cases, spread over blocks, every task asking for ``cpus``."""
    return read_cases(data_dir, case_ids=ids, num_cpus=cpus, blocks=spread_blocks(len(ids)))


CACHE_SHARE = 0.25  # cache_cases "auto": the decoded cases' share of the object store


def decoded_bytes(data_dir, ids) -> int:
    """Bytes of the decoded volumes (float32 image + uint8 label) of these cases."""
    cases = read_manifest(data_dir)["cases"]
    return sum(5 * int(np.prod(cases[i]["shape"])) for i in ids)


def should_cache(data_dir, ids, setting) -> bool:
    """Whether to keep the decoded cases in the object store for the whole run. "auto" caches
    a corpus that fills at most CACHE_SHARE of the object store and streams a larger one
    (read and decoded again every epoch: peak memory stays flat as the corpus grows, instead of
    spilling the cache to disk)."""
    if setting != "auto":
        return bool(setting)
    import ray

    store = ray.cluster_resources().get("object_store_memory", 0) if ray.is_initialized() else 0
    return decoded_bytes(data_dir, ids) <= CACHE_SHARE * store


@contextmanager
def block_order(deterministic: bool):
    """Datasets created inside keep their blocks in order when ``deterministic`` (Ray Data's
    ``preserve_order``), caching (``materialize``) included; by default blocks go on in the
    order their tasks finish, which differs from run to run. Measured with one and two
    streaming splits: set on a finished dataset's context only, the cached cases' block order
    still differed between runs; set while the dataset is built, every run fed the same
    patches in the same order (with a seeded shuffle buffer)."""
    from ray.data.context import DataContext

    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = before or deterministic
    try:
        yield
    finally:
        options.preserve_order = before


def build_pretrain_dataset(data_dir, cfg: PretrainConfig, epoch_offset: int = 0):
    """The Ray Dataset of pre-training examples of one epoch (re-executed every epoch)."""
    ids, labelled = pretraining_cases(data_dir, cfg.pretrain_label_fraction, cfg.target_images)
    num_classes = len(read_manifest(data_dir)["class_map"])
    with block_order(cfg.patches.deterministic):
        ds = decoded_cases(data_dir, ids, cfg.patches.cpus_per_data_task).map(
            partial(_pretrain_case, labelled=frozenset(labelled), num_classes=num_classes),
            num_cpus=cfg.patches.cpus_per_data_task,
        )
        if should_cache(data_dir, ids, cfg.patches.cache_cases):
            ds = ds.materialize()
        return ds.map_batches(
            partial(_pretrain_examples, cfg=cfg, epoch_offset=epoch_offset),
            batch_size=1,
            num_cpus=cfg.patches.cpus_per_data_task,
        )
