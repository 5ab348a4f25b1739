"""The driver's side of a stage: ``fit_stage`` sizes a ``StageJob``, starts Ray Train's worker
group on it (``mixcl_ray.engine.run_stage`` on every worker) and returns the last checkpoint."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from mixcl_ray.checkpoints import load_checkpoint_state
from mixcl_ray.engine import FAIL_AFTER_EPOCH_ENV, Stage, StageJob, run_stage


def data_config(deterministic: bool, object_store_mb: int = 0):
    """Ray Train's ingest options: Train's defaults, with Ray Data's ``preserve_order`` when
    the feed must be deterministic (blocks handed over in order, and split between the
    workers without locality hints or buffering), and the feed's object-store budget when
    ``object_store_mb`` is set (Ray Data takes the smaller of it and half the store)."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    if deterministic:
        options.preserve_order = True
    if object_store_mb:
        options.resource_limits = options.resource_limits.copy(
            object_store_memory=object_store_mb * 2**20
        )
    return ray.train.DataConfig(execution_options=options)


def fit_stage(
    stage_cls: type[Stage],
    config,
    *,
    patches_per_epoch: int,
    storage,
    name: str,
    callbacks,
    dataset_for,
    job_cls: type[StageJob] = StageJob,
    **job_fields,
) -> tuple:
    """Run one Ray Train stage of ``config``; returns (last checkpoint folder, last metrics, the
    last checkpoint's ``extra``: the epoch history, the hardware, what the stage kept).
    ``storage`` may be an object-store URI; the folder returned is then a URI too.
    ``dataset_for(epoch_offset)``: the stage's Ray Dataset, its draws starting at that epoch;
    ``job_fields``: what the stage's workers get besides the config (a ``job_cls``).

    Re-running with the same storage and name resumes from the last checkpoint; a worker
    failure restarts the group from it (``scaling.max_failures`` times). With
    ``patches.deterministic`` the dataset's blocks reach the workers in the same order every
    run (``data_config``)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from data_prep import locations
    from mixcl_ray.checkpoints import resume_epoch
    from mixcl_ray.storage import ensure_writable
    from mixcl_ray.train_utils import cpus_per_worker

    scaling, patches = config.scaling, config.patches
    storage = ensure_writable(storage)
    per_worker_cpus = cpus_per_worker(scaling, ray.cluster_resources().get("CPU", 1))
    failure = os.environ.get(FAIL_AFTER_EPOCH_ENV)
    job = job_cls(
        config=config,
        steps_per_epoch=max(1, patches_per_epoch // (patches.batch_size * scaling.workers)),
        torch_threads=max(1, int(per_worker_cpus)),
        fail_after_epoch=int(failure) if failure else None,
        **job_fields,
    )
    dataset = dataset_for(resume_epoch(locations.join(storage, name)))
    trainer = TorchTrainer(
        functools.partial(run_stage, stage_cls, job),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": per_worker_cpus},
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            callbacks=callbacks,
            failure_config=ray.train.FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
        dataset_config=data_config(patches.deterministic, patches.object_store_mb),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name} finished without a checkpoint: {result.error}")
    folder = locations.join(storage, name, Path(result.checkpoint.path).name)
    with result.checkpoint.as_directory() as local:
        extra = load_checkpoint_state(local)["extra"]
    return folder, dict(result.metrics or {}), extra
