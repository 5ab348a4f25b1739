"""The sweep's pre-training cache: every trial with the same pre-training config and data
shares one pre-trained checkpoint (keyed by a hash of both). The first trial trains it under a
file lock, the others wait for it and reuse it."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

from data_prep import locations
from data_prep.locations import describe
from mixcl_ray import tracking, tracking_buffer
from mixcl_ray.dimensions import pretrain_params
from mixcl_ray.storage import local_scratch

DONE = "DONE.json"


def cached_pretraining(pre_cfg, ctx, owner: str = "") -> tuple[Path, str, bool]:
    """(pretrained.pt, cache key, reused?) for a pre-training config; trains it once. With
    the sweep's ``pretrain_cache`` off, the key includes ``owner`` (the trial's key): every
    trial trains its own."""
    from mixcl_ray.config import to_dict
    from mixcl_ray.pretrain import run_pretraining
    from mixcl_ray.train_utils import run_name

    key = run_name("pretrain", to_dict(pre_cfg), ctx.fingerprint)
    if not ctx.pretrain_cache:
        key = f"{key}-{owner}"
    cache = locations.join(ctx.storage, "pretrain_cache")
    # the lock is a local file: beside the cache on a shared filesystem; on this node only when
    # the cache is in an object store (trials of the same key on two nodes may then both train)
    locks = local_scratch(ctx.storage, "pretrain_cache")
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent trial with the same key waits here
        done = locations.join(cache, key, DONE)
        if locations.exists(done):
            cached = json.loads(locations.read_text(done))["pretrained"]
            return locations.as_location(cached), key, True
        run_id = tracking.start_run(
            ctx.uri,
            ctx.experiment_id,
            f"pretrain {key}",
            {"mixcl.stage": "pretrain"},
            pretrain_params(pre_cfg, key, preset=ctx.preset, fingerprint=ctx.fingerprint),
            parent_id=ctx.parent_id,
            reuse_tag=("mixcl.pretrain_key", key),
            continue_interrupted=False,
        )
        result = run_pretraining(
            ctx.data,
            cache,
            pre_cfg,
            name=key,
            callbacks=[tracking_buffer.EpochMetricsCallback(ctx.uri, run_id)],
        )
        tracking.set_tags(
            ctx.uri,
            run_id,
            {"checkpoint": describe(result.checkpoint), tracking.HARDWARE_TAG: result.hardware},
        )
        tracking.end_run(ctx.uri, run_id)
        locations.write_text(
            done,
            json.dumps(
                {
                    "pretrained": str(result.pretrained),
                    "checkpoint": str(result.checkpoint),
                    "run_id": run_id,
                }
            ),
        )
        return result.pretrained, key, False
