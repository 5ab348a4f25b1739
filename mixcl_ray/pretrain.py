"""MixCL pre-training on Ray Train: ``python -m mixcl_ray.pretrain --data OUT --storage DIR``.

Each worker runs ``pretrain_loop``: it rebuilds the typed config, builds model, loss and
optimiser, resumes from ``ray.train.get_checkpoint()`` if there is one, and per epoch streams
its shard of two-view examples, reports every loss term, patches/s and the share of step time
spent waiting for data, and (rank 0) attaches a checkpoint. Re-running the same command with the
same storage resumes an interrupted run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep import locations
from data_prep.locations import Location, describe
from mixcl_ray.storage import ensure_writable
from mixcl_ray.train_config import PretrainConfig, from_dict, load_config, to_dict

PRETRAINED_FILE = "pretrained.pt"


def pretrain_loop(loop_config: dict) -> None:
    """The per-worker training function (Ray Train)."""
    import ray.train
    import ray.train.torch

    from mixcl_ray.losses import MixCLLoss, view_outputs
    from mixcl_ray.models import MixCLModel, save_pretrained
    from mixcl_ray.train_utils import (
        autocast,
        build_optimizer,
        build_scheduler,
        epoch_batches,
        grad_scaler,
        hardware,
        load_checkpoint_state,
        maybe_inject_failure,
        optimizer_step,
        restore_state,
        save_checkpoint_dir,
        training_state,
    )

    cfg = from_dict(PretrainConfig, loop_config["config"])
    torch.set_num_threads(max(1, int(loop_config["torch_threads"])))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    computed_on = hardware(device)  # recorded in every checkpoint
    torch.manual_seed(cfg.optim.seed + rank)
    generator = torch.Generator().manual_seed(cfg.optim.seed * 1000 + rank)
    model = MixCLModel(cfg.model)
    loss_fn = MixCLLoss(cfg.loss)
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    optimizer = build_optimizer(model, cfg.optim)
    steps_per_epoch = loop_config["steps_per_epoch"]
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch)
    scaler = grad_scaler(device, cfg.scaling.amp)
    start_epoch, step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint_state(folder)
            start_epoch, step = restore_state(state, model, optimizer, scheduler, scaler, generator)
            history = state["extra"].get("history", [])
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, cfg.optim.epochs):
        model.train()
        sums: dict[str, float] = {}
        excess, labelled_batches = 0.0, 0
        batches = patches = 0
        wait = 0.0
        start = time.perf_counter()
        tick = start
        for batch in epoch_batches(shard, cfg.patches, cfg.optim.seed, epoch, rank, device):
            wait += time.perf_counter() - tick
            with autocast(device, cfg.scaling.amp):
                out1, out2 = view_outputs(model, loss_fn.heads, batch)
                diagnostics = {}
                terms = loss_fn(
                    out1, out2, batch, step=step, generator=generator, diagnostics=diagnostics
                )
            optimizer_step(terms["loss"], model, optimizer, scaler, scheduler, cfg.optim.grad_clip)
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            if "label_excess" in diagnostics:
                excess += float(diagnostics["label_excess"])
                labelled_batches += 1
            batches += 1
            patches += batch["input1"].shape[0]
            step += 1
            tick = time.perf_counter()
        seconds = time.perf_counter() - start
        metrics = {
            f"train/{'loss' if k == 'loss' else 'loss_' + k}": v / max(1, batches)
            for k, v in sums.items()
        }
        metrics.update(
            {
                "epoch": epoch,
                "step": step,
                "train/patches_per_s": patches * ctx.get_world_size() / seconds,
                "train/data_wait_share": wait / seconds,
                "train/epoch_seconds": seconds,
                "train/lr": scheduler.get_last_lr()[0],
                "resumed_from_epoch": start_epoch,  # > 0: this worker group restarted there
            }
        )
        if cfg.loss.l_label > 0:
            # the label term is 0 on batches without labelled voxels, so its mean alone mixes
            # how often a batch holds labels with how well they are separated
            metrics["train/label_batch_share"] = labelled_batches / max(1, batches)
            if labelled_batches:
                metrics["train/label_excess"] = excess / labelled_batches
        if device.type == "cuda":
            metrics["train/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if rank == 0:
            history.append(metrics)
            extra = {"history": history, "hardware": computed_on}
            state = training_state(
                model, optimizer, scheduler, scaler, epoch, step, generator, extra
            )
            folder = save_checkpoint_dir(
                state, {PRETRAINED_FILE: lambda p: save_pretrained(model, p, to_dict(cfg.model))}
            )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"epoch_{epoch:04d}",
                delete_local_checkpoint_after_upload=True,
            )
        else:
            ray.train.report(metrics)
        maybe_inject_failure(loop_config, epoch)


@dataclass
class PretrainResult:
    checkpoint: Location  # folder (or URI) of the last epoch's checkpoint (holds pretrained.pt)
    pretrained: Location
    metrics: dict
    history: list[dict]
    storage: Location
    name: str
    hardware: str | None = None  # what rank 0 trained on (None: a checkpoint from before)


def run_pretraining(
    data_dir,
    storage,
    config: PretrainConfig,
    name: str | None = None,
    callbacks: list | None = None,
) -> PretrainResult:
    """Pre-train with Ray Train (Ray must be initialised). Re-running with the same storage and
    name resumes from the last checkpoint."""
    import ray

    from data_prep.reader import read_manifest
    from mixcl_ray.feed import build_pretrain_dataset, pretraining_cases
    from mixcl_ray.models import check_patch_size
    from mixcl_ray.models.backbones import build_backbone
    from mixcl_ray.train_utils import cpus_per_worker, fit_stage, resume_epoch, run_name

    check_patch_size(build_backbone(config.model), config.patches.patch_size)
    manifest = read_manifest(data_dir)
    config_dict = to_dict(config)
    name = name or run_name("pretrain", config_dict, manifest["input_fingerprint"])
    storage = ensure_writable(storage)
    run_dir = locations.join(storage, name)
    ids, _ = pretraining_cases(data_dir, config.pretrain_label_fraction, config.target_images)
    workers = config.scaling.workers
    per_worker = cpus_per_worker(config.scaling, ray.cluster_resources().get("CPU", 1))
    steps_per_epoch = max(
        1, len(ids) * config.patches.patches_per_case // (config.patches.batch_size * workers)
    )
    dataset = build_pretrain_dataset(data_dir, config_dict, epoch_offset=resume_epoch(run_dir))
    loop_config = {
        "config": config_dict,
        "steps_per_epoch": steps_per_epoch,
        "torch_threads": max(1, int(per_worker)),
    }
    folder, metrics, extra = fit_stage(
        pretrain_loop, loop_config, config, per_worker, storage, name, callbacks, dataset
    )
    return PretrainResult(
        folder,
        locations.join(folder, PRETRAINED_FILE),
        metrics,
        extra.get("history", []),
        storage,
        name,
        extra.get("hardware"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mixcl_ray.pretrain",
        description="MixCL pre-training on Ray Train (DDP workers fed by Ray Data). Re-running the same "
        "command with the same --storage resumes an interrupted run.",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="output folder (or object-store URI) of `python -m data_prep prepare`",
    )
    parser.add_argument(
        "--storage",
        required=True,
        help="folder for checkpoints: local, a filesystem every node mounts, or an object-store "
        "URI such as s3://bucket/runs",
    )
    parser.add_argument("--preset", choices=["cpu-tiny", "paper"], default="cpu-tiny")
    parser.add_argument(
        "--config", type=Path, help="YAML overrides, e.g. {loss: {l_rec: 0}, optim: {epochs: 20}}"
    )
    parser.add_argument(
        "--method",
        choices=["mixcl", "identity", "reconstruction", "label"],
        default=None,
        help="a baseline is a setting of the same code: which loss terms are on (mixcl: label "
        "and reconstruction consistency, l_id 0, see the README; without --method, the config's "
        "loss weights: all three terms at 1 by default)",
    )
    parser.add_argument("--workers", type=int, help="Ray Train workers")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    parser.add_argument(
        "--name", help="run name (default: derived from config and data, so re-runs resume)"
    )
    parser.add_argument("--address", help="Ray address (e.g. auto); default: start Ray locally")
    parser.add_argument(
        "--experiment",
        default="mixcl_ray-pretrain",
        help="MLflow experiment (the store: <storage>/mlflow.db, or MLFLOW_TRACKING_URI)",
    )
    return parser


def overrides_from_args(args) -> dict:
    from mixcl_ray.config import METHODS

    overrides: dict = {}
    if args.method:
        l_id, l_label, l_rec = METHODS[args.method]
        overrides["loss"] = {"l_id": l_id, "l_label": l_label, "l_rec": l_rec}
    if args.workers:
        overrides.setdefault("scaling", {})["workers"] = args.workers
    if args.gpu:
        overrides.setdefault("scaling", {})["use_gpu"] = True
    if args.epochs:
        overrides.setdefault("optim", {})["epochs"] = args.epochs
    return overrides


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config("pretrain", args.preset, args.config)
        if overrides_from_args(args):
            from mixcl_ray.train_config import merge

            config = merge(config, overrides_from_args(args))
        storage = ensure_writable(args.storage)
        from mixcl_ray.ray_start import init_ray

        init_ray(args.address)
        from data_prep.reader import read_manifest
        from mixcl_ray.progress import EpochLines
        from mixcl_ray.run_tracking import StandaloneRun
        from mixcl_ray.trial import pretrain_params

        context = {
            "preset": config.preset,
            "fingerprint": read_manifest(args.data)["input_fingerprint"],
        }
        params = pretrain_params(config, context, args.name or "")
        run_name = args.name or f"pretrain seed {config.optim.seed}"
        with (
            StandaloneRun("pretrain", storage, args.experiment, run_name, params) as run,
            EpochLines("pretrain", config.optim.epochs) as lines,
        ):
            result = run_pretraining(
                args.data, storage, config, args.name, callbacks=[lines.callback, *run.callbacks]
            )
            run.finish({"checkpoint": describe(result.checkpoint), "hardware": result.hardware})
    except (ValueError, OSError) as err:  # OSError: missing files, an object store refused
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = result.metrics
    print(
        json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}, indent=1)
    )
    print(f"trained on: {result.hardware}")
    print(f"pre-training {result.name} done: final checkpoint {describe(result.checkpoint)}")
    print(f"pre-trained weights for fine-tuning: {describe(result.pretrained)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
