"""One sweep trial: (cached) pre-training, then fine-tuning at the trial's label fraction, then
the test-split score and overlays, all recorded in the trial's MLflow run.

Runs inside a Ray Tune function trainable; launches Ray Train work for each stage. A
pre-trained checkpoint is shared by every trial with the same pre-training config and data
(keyed by a hash of both): the first trial trains it under a file lock, the others reuse it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from data_prep import locations
from data_prep.locations import describe, open_for_torch
from mixcl_ray import tracking
from mixcl_ray.config import METHODS
from mixcl_ray.storage import local_scratch

DONE = "DONE.json"


def pretrain_overrides(sample: dict, fixed: dict) -> dict | None:
    """Stage overrides of the pre-training a sample asks for (None for scratch)."""
    weights = METHODS[sample.get("method", "mixcl")]
    if weights is None:
        return None
    loss = {"l_id": weights[0], "l_label": weights[1], "l_rec": weights[2]}
    for key in ("l_id", "l_label", "l_rec", "temperature_id", "temperature_label"):
        if key in sample:
            loss[key] = sample[key]
    over = _deep(fixed, {"loss": loss, "optim": {"seed": int(sample.get("seed", 0))}})
    if "pretrain_lr" in sample:
        over = _deep(over, {"optim": {"lr": sample["pretrain_lr"]}})
    if "pretrain_label_fraction" in sample:
        over["pretrain_label_fraction"] = sample["pretrain_label_fraction"]
    if "crop_offset" in sample:
        over = _deep(over, {"views": {"crop_offset": int(sample["crop_offset"])}})
    if "dense_source" in sample:
        over = _deep(over, {"model": {"dense_source": sample["dense_source"]}})
    return over


def finetune_overrides(sample: dict, fixed: dict) -> dict:
    over = _deep(
        fixed,
        {
            "label_fraction": sample.get("label_fraction", 1.0),
            "optim": {"seed": int(sample.get("seed", 0))},
        },
    )
    if "lr" in sample:
        over = _deep(over, {"optim": {"lr": sample["lr"]}})
    if "pretrained_lr_scale" in sample:
        over["pretrained_lr_scale"] = sample["pretrained_lr_scale"]
    return over


def trial_scaling(ctx: dict, stage: dict | None, cluster_cpus: float) -> dict:
    """A trial's Train scaling: the sweep's workers and GPUs; on CPU, with several trials at
    once (``max_concurrent_trials``), each trial's workers reserve their share of that trial's
    part of the CPUs unless the stage sets ``scaling.cpus_per_worker``. (Sized on the whole
    cluster, two trials' workers would reserve every CPU and leave Ray Data none: a hang.)"""
    from mixcl_ray.config import ScalingSettings
    from mixcl_ray.train_utils import cpus_per_worker

    scaling = {"workers": ctx["workers"], "use_gpu": ctx["gpus_per_worker"] > 0}
    concurrent = int(ctx.get("max_concurrent_trials", 1))
    explicit = ((stage or {}).get("scaling") or {}).get("cpus_per_worker") is not None
    if concurrent > 1 and not scaling["use_gpu"] and not explicit:
        share = cluster_cpus / concurrent
        scaling["cpus_per_worker"] = cpus_per_worker(ScalingSettings(ctx["workers"]), share)
    return scaling


def _deep(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return out


def trial_params(sample: dict, pre_cfg, ft_cfg, ctx: dict) -> dict:
    """The flat param vocabulary every trial run carries."""
    loss = pre_cfg.loss if pre_cfg is not None else None
    return {
        "method": sample.get("method", "mixcl"),
        "l_id": loss.l_id if loss else 0.0,
        "l_label": loss.l_label if loss else 0.0,
        "l_rec": loss.l_rec if loss else 0.0,
        "temperature_id": loss.temperature_id if loss else "",
        "temperature_label": loss.temperature_label if loss else "",
        "pretrain_label_fraction": pre_cfg.pretrain_label_fraction if pre_cfg else "",
        "crop_offset": pre_cfg.views.crop_offset if pre_cfg else "",
        "dense_source": pre_cfg.model.dense_source if pre_cfg else "",
        "label_fraction": ft_cfg.label_fraction,
        "seed": ft_cfg.optim.seed,
        "lr": ft_cfg.optim.lr,
        "pretrain_epochs": pre_cfg.optim.epochs if pre_cfg else 0,
        "finetune_epochs": ft_cfg.optim.epochs,
        "load_decoder": ft_cfg.load_decoder if pre_cfg else "",
        "pretrained_lr_scale": ft_cfg.pretrained_lr_scale
        if ft_cfg.scaled_parts(bool(pre_cfg))
        else "",
        "preset": ctx["preset"],
        "data_fingerprint": ctx["fingerprint"][:16],
        "workers": ft_cfg.scaling.workers,
    }


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


def pretrain_params(pre_cfg, ctx: dict, key: str) -> dict:
    """The params of a pre-training run: its loss settings and what else tells two cached
    pre-trainings apart (seed, views, corpus, schedule), so that the runs of a multi-seed
    study can be told apart in MLflow."""
    from mixcl_ray.config import to_dict

    return {
        "cache_key": key,
        "preset": ctx["preset"],
        "data_fingerprint": ctx["fingerprint"][:16],
        **to_dict(pre_cfg.loss),
        "epochs": pre_cfg.optim.epochs,
        "seed": pre_cfg.optim.seed,
        "lr": pre_cfg.optim.lr,
        "crop_offset": pre_cfg.views.crop_offset,
        "dense_source": pre_cfg.model.dense_source,
        "pretrain_label_fraction": pre_cfg.pretrain_label_fraction,
        "target_images": pre_cfg.target_images,
        "patch_size": "x".join(str(s) for s in pre_cfg.patches.patch_size),
        "batch_size": pre_cfg.patches.batch_size,
        "workers": pre_cfg.scaling.workers,
    }


def cached_pretraining(pre_cfg, ctx: dict, owner: str = "") -> tuple[Path, str, bool]:
    """(pretrained.pt, cache key, reused?) for a pre-training config; trains it once. With
    the sweep's ``pretrain_cache`` off, the key includes ``owner`` (the trial's key): every
    trial trains its own."""
    from mixcl_ray.config import to_dict
    from mixcl_ray.pretrain import run_pretraining
    from mixcl_ray.train_utils import run_name

    key = run_name("pretrain", to_dict(pre_cfg), ctx["fingerprint"])
    if not ctx.get("pretrain_cache", True):
        key = f"{key}-{owner}"
    cache = locations.join(ctx["storage"], "pretrain_cache")
    # the lock is a local file: beside the cache on a shared filesystem; on this node only when
    # the cache is in an object store (trials of the same key on two nodes may then both train)
    locks = local_scratch(ctx["storage"], "pretrain_cache")
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent trial with the same key waits here
        done = locations.join(cache, key, DONE)
        if locations.exists(done):
            cached = json.loads(locations.read_text(done))["pretrained"]
            return locations.as_location(cached), key, True
        run_id = tracking.start_run(
            ctx["uri"],
            ctx["experiment_id"],
            f"pretrain {key}",
            {"mixcl.stage": "pretrain"},
            pretrain_params(pre_cfg, ctx, key),
            parent_id=ctx["parent_id"],
            reuse_tag=("mixcl.pretrain_key", key),
            continue_interrupted=False,
        )
        result = run_pretraining(
            ctx["data"],
            cache,
            pre_cfg,
            name=key,
            callbacks=[tracking.EpochMetricsCallback(ctx["uri"], run_id)],
        )
        tracking.set_tags(
            ctx["uri"],
            run_id,
            {"checkpoint": describe(result.checkpoint), tracking.HARDWARE_TAG: result.hardware},
        )
        tracking.end_run(ctx["uri"], run_id)
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


def test_scores(
    data_dir, ft_cfg, best_model, out_dir: Path, overlays: int = 3
) -> tuple[dict, list[Path]]:
    """Test-split Dice of the best weights (``test/dice_mean``, ``test/dice/<organ>``) and a few
    overlay PNGs (image / ground truth / prediction)."""
    import torch

    from data_prep.reader import load_case, read_splits
    from mixcl_ray.evaluate import nan_mean
    from mixcl_ray.evaluate import validate_cases as _validate
    from mixcl_ray.feed import class_lookup, target_source
    from mixcl_ray.models import SegmentationNet
    from mixcl_ray.plots import overlay_png

    source = target_source(data_dir, ft_cfg.source)
    lut, names = class_lookup(data_dir, source)
    ids = (
        read_splits(data_dir)["sources"][source]["test"]
        or read_splits(data_dir)["sources"][source]["val"]
    )
    model = SegmentationNet(ft_cfg.model, len(names))
    weights = torch.load(open_for_torch(best_model), map_location="cpu", weights_only=True)
    model.load_state_dict(weights["model"])
    cases = [dict(c, label=lut[c["label"]]) for c in (load_case(data_dir, i) for i in ids)]
    pngs = []

    def draw(case, prediction):  # the scored prediction of the first cases, not a second one
        if len(pngs) < overlays:
            path = out_dir / f"overlay_{case['case_id'].replace('/', '_')}.png"
            overlay_png(
                case["image"], case["label"], prediction[0, 0].numpy(), path, case["case_id"]
            )
            pngs.append(path)

    per_case = _validate(
        model,
        cases,
        len(names),
        ft_cfg.patches.patch_size,
        torch.device("cpu"),
        ft_cfg.sw_batch_size,
        ft_cfg.sw_overlap,
        on_prediction=draw,
    )
    table = np.stack([per_case[k] for k in sorted(per_case)])
    per_class = [nan_mean(table[:, c]) for c in range(table.shape[1])]
    metrics = {
        "test/dice_mean": nan_mean(per_class),
        "test/cases": len(cases),
        **{f"test/dice/{n}": d for n, d in zip(names[1:], per_class, strict=True)},
    }
    return metrics, pngs


def _tune_trial_id() -> str:
    from ray import tune

    try:
        return tune.get_context().get_trial_id() or ""
    except Exception:  # outside a Tune session (direct calls)
        return ""


def run_trial(config: dict, sweep: dict) -> None:
    """Ray Tune function trainable: ``config`` holds the sampled dimensions; ``sweep`` the
    sweep's context (data, storage, tracking URI, stage settings), passed through the object
    store with ``tune.with_parameters`` so that it never lands in Tune's logs or result files
    (the tracking URI may carry credentials)."""
    import ray
    from ray.tune.integration.ray_train import TuneReportCallback

    from mixcl_ray.checkpoints import resume_epoch
    from mixcl_ray.config import load_config, to_dict
    from mixcl_ray.finetune import run_finetuning
    from mixcl_ray.ray_start import init_ray

    init_ray()
    ctx = sweep
    sample = dict(config)
    cpus = ray.cluster_resources().get("CPU", 1)
    pre_fixed = _deep(ctx["pretrain"], {"scaling": trial_scaling(ctx, ctx["pretrain"], cpus)})
    pre_over = pretrain_overrides(sample, pre_fixed)
    pre_cfg = (
        load_config("pretrain", ctx["preset"], overrides=pre_over) if pre_over is not None else None
    )
    ft_fixed = _deep(ctx["finetune"], {"scaling": trial_scaling(ctx, ctx["finetune"], cpus)})
    ft_cfg = load_config("finetune", ctx["preset"], overrides=finetune_overrides(sample, ft_fixed))
    params = trial_params(sample, pre_cfg, ft_cfg, ctx)
    key = trial_key(params, pre_cfg, ft_cfg)
    uri = ctx["uri"]
    done = tracking.find_run(uri, ctx["experiment_id"], ("mixcl.trial_key", key), ctx["parent_id"])
    if done is not None and done.info.status == "FINISHED":
        # finished before the sweep driver was lost, after Tune last saved its state: report
        # the recorded result instead of training again
        from ray import tune

        tune.report({**done.data.metrics, "epoch": ft_cfg.optim.epochs - 1, "reused_run": 1})
        return
    run_id = tracking.start_run(
        uri,
        ctx["experiment_id"],
        f"{params['method']} {100 * ft_cfg.label_fraction:g}% seed {ft_cfg.optim.seed}",
        {
            "mixcl.stage": "trial",
            "method": params["method"],
            tracking.TRIAL_ID_TAG: _tune_trial_id(),
            **ctx.get("code_tag", {}),
        },
        params,
        parent_id=ctx["parent_id"],
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
        ft_storage = locations.join(ctx["storage"], "finetune", ctx["sweep"])
        trained = resume_epoch(locations.join(ft_storage, f"finetune-{key}"))
        result = run_finetuning(
            ctx["data"],
            ft_storage,
            ft_cfg,
            pretrained=pretrained,
            name=f"finetune-{key}",
            callbacks=[tracking.EpochMetricsCallback(uri, run_id), TuneReportCallback()],
        )
        if trained >= ft_cfg.optim.epochs and result.history:
            # its last epoch was checkpointed before the trial was lost (in its test scoring):
            # nothing was left to train, so no epoch reached MLflow or Tune; they come from
            # the checkpoint's history (Tune stops a sweep whose trial reports nothing)
            from ray import tune

            for epoch in result.history:
                tracking.log_epoch(uri, run_id, epoch)
            tune.report(dict(result.history[-1]))
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            metrics, pngs = test_scores(ctx["data"], ft_cfg, result.best_model, tmp)
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
        tracking.set_tags(
            uri,
            run_id,
            {
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
