"""One sweep trial: (cached) pre-training, then fine-tuning at the trial's label fraction, then
the test-split score and overlays, all recorded in the trial's MLflow run.

Runs inside a Ray Tune function trainable; launches Ray Train work for each stage. The stages'
overrides and the run's params come from the dimension table (``mixcl_ray.dimensions``), the
shared pre-training from ``mixcl_ray.pretrain_cache``, the test score from ``mixcl_ray.scoring``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from data_prep import locations
from data_prep.locations import describe
from mixcl_ray import tracking, tracking_buffer


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares; it reaches the trials through the object store
    (``tune.with_parameters``), never Tune's logs or result files: the tracking URI may carry
    credentials."""

    data: str
    storage: str
    uri: str
    experiment_id: str
    parent_id: str
    sweep: str  # the sweep's name (its fine-tuning folder)
    preset: str
    fingerprint: str  # the prepared data's
    pretrain: dict  # the space's fixed overrides of each stage
    finetune: dict
    resources: dict  # workers, gpus_per_worker, max_concurrent_trials
    pretrain_cache: bool = True
    code_tag: dict | None = None  # the driver's commit: trials started by a resume carry its own


def trial_scaling(resources: dict, stage: dict | None, cluster_cpus: float) -> dict:
    """A trial's Train scaling: the sweep's workers and GPUs; on CPU, with several trials at
    once (``max_concurrent_trials``), each trial's workers reserve their share of that trial's
    part of the CPUs unless the stage sets ``scaling.cpus_per_worker``. (Sized on the whole
    cluster, two trials' workers would reserve every CPU and leave Ray Data none: a hang.)"""
    from mixcl_ray.config import ScalingSettings
    from mixcl_ray.train_utils import cpus_per_worker

    workers = resources["workers"]
    scaling = {"workers": workers, "use_gpu": resources["gpus_per_worker"] > 0}
    concurrent = int(resources.get("max_concurrent_trials", 1))
    explicit = ((stage or {}).get("scaling") or {}).get("cpus_per_worker") is not None
    if concurrent > 1 and not scaling["use_gpu"] and not explicit:
        share = cluster_cpus / concurrent
        scaling["cpus_per_worker"] = cpus_per_worker(ScalingSettings(workers), share)
    return scaling


def trial_key(params: dict, pre_cfg, ft_cfg) -> str:
    """What identifies a trial's result (its MLflow run, its fine-tuning folder): the params and
    every resolved setting of both stages, so that a sweep whose fixed ``pretrain:`` or
    ``finetune:`` overrides differ (e.g. ``min_patches_per_epoch``) trains again instead of
    taking another sweep's result for its own."""
    from mixcl_ray.config import to_dict

    identity = {
        "params": params,
        "pretrain": to_dict(pre_cfg) if pre_cfg is not None else None,
        "finetune": to_dict(ft_cfg),
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _tune_trial_id() -> str:
    from ray import tune

    try:
        return tune.get_context().get_trial_id() or ""
    except Exception:  # outside a Tune session (direct calls)
        return ""


def run_trial(config: dict, sweep: SweepContext) -> None:
    """Ray Tune function trainable: ``config`` holds the sampled dimensions; ``sweep`` what the
    sweep's trials share."""
    import ray
    from ray.tune.integration.ray_train import TuneReportCallback

    from mixcl_ray.checkpoints import resume_epoch
    from mixcl_ray.config import deep_merge, load_config, to_dict
    from mixcl_ray.dimensions import stage_overrides, trial_params
    from mixcl_ray.finetune import run_finetuning
    from mixcl_ray.pretrain_cache import cached_pretraining
    from mixcl_ray.ray_start import init_ray
    from mixcl_ray.scoring import scoring_threads, test_scores

    init_ray()
    ctx = sweep
    sample = dict(config)
    cpus = ray.cluster_resources().get("CPU", 1)
    configs = {}
    for stage, fixed in (("pretrain", ctx.pretrain), ("finetune", ctx.finetune)):
        scaling = trial_scaling(ctx.resources, fixed, cpus)
        over = stage_overrides(stage, sample, deep_merge(fixed, {"scaling": scaling}))
        configs[stage] = None if over is None else load_config(stage, ctx.preset, overrides=over)
    pre_cfg, ft_cfg = configs["pretrain"], configs["finetune"]
    params = trial_params(sample, pre_cfg, ft_cfg, preset=ctx.preset, fingerprint=ctx.fingerprint)
    key = trial_key(params, pre_cfg, ft_cfg)
    uri = ctx.uri
    done = tracking.find_run(uri, ctx.experiment_id, ("mixcl.trial_key", key), ctx.parent_id)
    if done is not None and done.info.status == "FINISHED":
        # finished before the sweep driver was lost, after Tune last saved its state: report
        # the recorded result instead of training again
        from ray import tune

        tune.report({**done.data.metrics, "epoch": ft_cfg.optim.epochs - 1, "reused_run": 1})
        return
    run_id = tracking.start_run(
        uri,
        ctx.experiment_id,
        f"{params['method']} {100 * ft_cfg.label_fraction:g}% seed {ft_cfg.optim.seed}",
        {
            "mixcl.stage": "trial",
            "method": params["method"],
            tracking.TRIAL_ID_TAG: _tune_trial_id(),
            **(ctx.code_tag or {}),
        },
        params,
        parent_id=ctx.parent_id,
        reuse_tag=("mixcl.trial_key", key),
        continue_interrupted=False,
    )
    try:
        pretrained = None
        if pre_cfg is not None:
            pretrained, cache_key, reused = cached_pretraining(pre_cfg, ctx, owner=key)
            tracking.log_params(uri, run_id, {"pretrain_cache_key": cache_key})
            tracking.set_tags(
                uri,
                run_id,
                {"pretrain_reused": reused, "pretrained_weights": describe(pretrained)},
            )
        # one folder per sweep: a new sweep trains its cells anew (a --resume keeps the
        # sweep's name, so its trials resume from their checkpoints); only pre-trainings are
        # shared between sweeps, through the cache
        ft_storage = locations.join(ctx.storage, "finetune", ctx.sweep)
        trained = resume_epoch(locations.join(ft_storage, f"finetune-{key}"))
        result = run_finetuning(
            ctx.data,
            ft_storage,
            ft_cfg,
            pretrained=pretrained,
            name=f"finetune-{key}",
            callbacks=[tracking_buffer.EpochMetricsCallback(uri, run_id), TuneReportCallback()],
        )
        if trained >= ft_cfg.optim.epochs and result.history:
            # its last epoch was checkpointed before the trial was lost (in its test scoring):
            # nothing was left to train, so no epoch reached MLflow or Tune; they come from
            # the checkpoint's history (Tune stops a sweep whose trial reports nothing)
            from ray import tune

            for epoch in result.history:
                tracking_buffer.log_epoch(uri, run_id, epoch)
            tune.report(dict(result.history[-1]))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            threads = scoring_threads(cpus, ctx.resources.get("max_concurrent_trials", 1))
            metrics, pngs = test_scores(ctx.data, ft_cfg, result.best_model, tmp, threads=threads)
            tracking.log_table(uri, run_id, metrics.pop("per_case"), tracking.PER_CASE_FILE)
            tracking.log_metrics(uri, run_id, metrics, step=ft_cfg.optim.epochs)
            (tmp / "config.json").write_text(
                json.dumps(
                    {
                        "sample": sample,
                        "finetune": to_dict(ft_cfg),
                        "pretrain": to_dict(pre_cfg) if pre_cfg else None,
                    },
                    indent=1,
                )
            )
            tracking.log_artifact(uri, run_id, tmp / "config.json")
            for png in pngs:
                tracking.log_artifact(uri, run_id, png, "overlays")
        from mixcl_ray.mlflow_model import log_model

        model_uri = log_model(uri, run_id, result.best_model, result.card)
        tracking.set_tags(
            uri,
            run_id,
            {
                "model_uri": model_uri,
                "best_checkpoint": describe(result.best_model),
                "load_report": result.load_summary or "",
                tracking.HARDWARE_TAG: result.hardware,
            },
        )
        tracking.end_run(uri, run_id, "FINISHED")
    except SystemExit:
        # Tune stops a trial's thread with SystemExit (scheduler stop, sweep end): the sweep
        # driver closes such runs as early stopped, or the next resume as interrupted
        raise
    except BaseException as err:
        tracking.fail_run(uri, run_id, err)
        raise
