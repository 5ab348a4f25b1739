"""Fine-tuning with a label fraction: ``python -m mixcl_ray.finetune --data OUT --label-fraction F``.

Builds the segmentation network, loads pre-trained encoder/decoder weights (reporting what
loaded), trains with MONAI DiceCE on the label-fraction subset that splits.json defines,
validates with sliding-window inference and per-class Dice, and keeps the best checkpoint.
Scratch is the same run without ``--pretrained``: every method gets the same budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep import locations
from data_prep.locations import Location, describe
from mixcl_ray.storage import ensure_writable
from mixcl_ray.train_config import FinetuneConfig, from_dict, load_config, merge, to_dict

BEST_FILE = "best_model.pt"


def finetune_loop(loop_config: dict) -> None:
    """The per-worker training function (Ray Train)."""
    import ray.train
    import ray.train.torch
    from monai.losses import DiceCELoss

    from data_prep.reader import load_case
    from mixcl_ray.evaluate import nan_mean, validate_cases
    from mixcl_ray.models import SegmentationNet, load_pretrained, unwrap
    from mixcl_ray.train_utils import (
        autocast,
        build_optimizer,
        build_scheduler,
        epoch_batches,
        gather,
        grad_scaler,
        hardware,
        load_checkpoint_state,
        maybe_inject_failure,
        optimizer_step,
        restore_state,
        save_checkpoint_dir,
        training_state,
    )

    loop_start = time.time()  # wall clock: the driver compares it with its own (fit_cost)
    cfg = from_dict(FinetuneConfig, loop_config["config"])
    torch.set_num_threads(max(1, int(loop_config["torch_threads"])))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    computed_on = hardware(device)  # recorded in every checkpoint
    torch.manual_seed(cfg.optim.seed + rank)
    names = loop_config["class_names"]
    model = SegmentationNet(cfg.model, num_classes=len(names))
    load_report = None
    if loop_config.get("pretrained"):
        load_report = load_pretrained(model, loop_config["pretrained"], parts=cfg.pretrained_parts)
    scaled = [
        p
        for part in cfg.scaled_parts(bool(loop_config.get("pretrained")))
        for p in getattr(model.backbone, part).parameters()
    ]
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model, cfg.optim, scaled, cfg.pretrained_lr_scale)
    scheduler = build_scheduler(optimizer, cfg.optim, loop_config["steps_per_epoch"])
    scaler = grad_scaler(device, cfg.scaling.amp)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    start_epoch, step, best, history = 0, 0, {"dice": -1.0, "epoch": -1}, []
    # rank 0 holds the best weights so far (on CPU) and writes them into every checkpoint, so
    # the last checkpoint always has them and no local checkpoint folder has to outlive its upload
    best_weights = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint_state(folder)
            start_epoch, step = restore_state(state, model, optimizer, scheduler, scaler)
            best = state["extra"]["best"]
            history = state["extra"].get("history", [])
            if rank == 0 and (Path(folder) / BEST_FILE).exists():
                best_weights = torch.load(
                    Path(folder) / BEST_FILE, map_location="cpu", weights_only=True
                )
    lut = np.asarray(loop_config["lut"], dtype=np.uint8)
    my_val = [
        dict(c, label=lut[c["label"]])
        for c in (
            load_case(loop_config["data_dir"], i) for i in loop_config["val_ids"][rank::world]
        )
    ]
    shard = ray.train.get_dataset_shard("train")
    report_s = 0.0  # the previous epoch's report (checkpoint upload included)
    for epoch in range(start_epoch, cfg.optim.epochs):
        epoch_start = time.time()
        model.train()
        total, batches, patches, wait = 0.0, 0, 0, 0.0
        start = tick = time.perf_counter()
        for batch in epoch_batches(shard, cfg.patches, cfg.optim.seed, epoch, rank, device):
            wait += time.perf_counter() - tick
            with autocast(device, cfg.scaling.amp):
                loss = loss_fn(model(batch["image"]), batch["label"].long())
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite DiceCE loss ({loss.item()}) at step {step}: lower the learning rate"
                )
            optimizer_step(loss, model, optimizer, scaler, scheduler, cfg.optim.grad_clip)
            total += float(loss.detach())
            batches += 1
            patches += batch["image"].shape[0]
            step += 1
            tick = time.perf_counter()
        seconds = time.perf_counter() - start
        metrics = {
            "epoch": epoch,
            "step": step,
            "train/loss": total / max(1, batches),
            "train/patches_per_s": patches * world / seconds,
            "train/data_wait_share": wait / seconds,
            "train/lr": scheduler.get_last_lr()[0],
            "resumed_from_epoch": start_epoch,  # > 0: this worker group restarted there
            # where the time goes (seconds; benchmarks/fit_cost.py adds them up)
            "time/train_s": seconds,
            "time/data_wait_s": wait,
            "time/prev_report_s": report_s,
        }
        if epoch == start_epoch:  # model, optimiser, resume and validation cases
            metrics["time/loop_start"] = loop_start
            metrics["time/setup_s"] = epoch_start - loop_start
        if load_report is not None:
            metrics["pretrained/loaded_tensors"] = len(load_report.loaded)
        if len(optimizer.param_groups) > 1:  # the loaded (or scale_scratch) parameters' rate
            metrics["train/lr_pretrained"] = scheduler.get_last_lr()[1]
        validate = (epoch + 1) % cfg.val_every == 0 or epoch == cfg.optim.epochs - 1
        tick = time.perf_counter()
        if validate:
            results = {}
            for part in gather(
                validate_cases(
                    unwrap(model),
                    my_val,
                    len(names),
                    cfg.patches.patch_size,
                    device,
                    cfg.sw_batch_size,
                    cfg.sw_overlap,
                    autocast(device, cfg.scaling.amp),
                )
            ):
                results.update(part)
            per_case = np.stack([results[k] for k in sorted(results)])  # (cases, classes - 1)
            per_class = [nan_mean(per_case[:, c]) for c in range(per_case.shape[1])]
            metrics["val/dice_mean"] = nan_mean(per_class)
            metrics.update({f"val/dice/{n}": d for n, d in zip(names[1:], per_class, strict=True)})
            improved = metrics["val/dice_mean"] > best["dice"]
            if improved:
                best = {"dice": metrics["val/dice_mean"], "epoch": epoch}
            metrics["val/best_dice_mean"] = best["dice"]
        else:
            improved = False
        metrics["time/val_s"] = time.perf_counter() - tick
        tick = time.perf_counter()
        if rank == 0:
            history.append(metrics)
            state = training_state(
                model,
                optimizer,
                scheduler,
                scaler,
                epoch,
                step,
                extra={"best": best, "history": history, "hardware": computed_on},
            )
            if improved:
                weights = unwrap(model).state_dict()
                best_weights = {"model": {k: v.detach().cpu().clone() for k, v in weights.items()}}
                best_weights.update(best)
            extra = {}
            if best_weights is not None:  # the weights with what predict needs to use them
                with_card = {**best_weights, "card": loop_config["model_card"]}
                extra[BEST_FILE] = lambda p, w=with_card: torch.save(w, p)
            folder = save_checkpoint_dir(state, extra)
            metrics["time/save_s"] = time.perf_counter() - tick
            metrics["time/epoch_end"] = time.time()
            tick = time.perf_counter()
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=f"epoch_{epoch:04d}",
                delete_local_checkpoint_after_upload=True,  # persisted: the temporary copy goes
            )
        else:
            ray.train.report(metrics)
        report_s = time.perf_counter() - tick
        maybe_inject_failure(loop_config, epoch)


@dataclass
class FinetuneResult:
    checkpoint: Location
    best_model: Location
    metrics: dict
    history: list[dict]
    load_summary: str | None
    name: str
    hardware: str | None = None  # what rank 0 trained on (None: a checkpoint from before)


def run_finetuning(
    data_dir,
    storage,
    config: FinetuneConfig,
    pretrained=None,
    name: str | None = None,
    callbacks: list | None = None,
) -> FinetuneResult:
    """Fine-tune with Ray Train (Ray must be initialised); resumes a run of the same name."""
    import ray

    from data_prep.reader import read_manifest, read_splits
    from mixcl_ray.feed import (
        build_finetune_dataset,
        class_lookup,
        finetune_epoch_size,
        target_source,
    )
    from mixcl_ray.models import SegmentationNet, check_patch_size, load_pretrained
    from mixcl_ray.pretrain import PRETRAINED_FILE
    from mixcl_ray.train_utils import cpus_per_worker, fit_stage, resume_epoch, run_name

    check_patch_size(SegmentationNet(config.model, 2).backbone, config.patches.patch_size)
    source = target_source(data_dir, config.source)
    config = merge(config, {"source": source})
    lut, names = class_lookup(data_dir, source)
    splits = read_splits(data_dir)["sources"][source]
    if not splits["val"]:
        raise ValueError(f"source {source} has no validation cases in splits.json")
    summary = None
    if pretrained is not None:
        pretrained = locations.as_location(pretrained)
        if not locations.is_file(pretrained):  # a pre-training checkpoint folder
            pretrained = locations.join(pretrained, PRETRAINED_FILE)
        if not locations.is_file(pretrained):
            raise FileNotFoundError(f"pre-trained weights not found: {describe(pretrained)}")
        summary = load_pretrained(
            SegmentationNet(config.model, len(names)), pretrained, parts=config.pretrained_parts
        ).summary()
    config_dict = to_dict(config)
    manifest = read_manifest(data_dir)
    model_card = {  # what a prediction on a raw scan needs (mixcl_ray.predict)
        "class_names": names,
        "preset": manifest["preset"],
        "modality": manifest["sources"][source]["modality"],
        "finetune_config": config_dict,
        "pretrained": str(pretrained) if pretrained else None,
        "data_fingerprint": manifest["input_fingerprint"],
    }
    name = name or run_name(
        "finetune",
        {"config": config_dict, "pretrained": str(pretrained)},
        manifest["input_fingerprint"],
    )
    workers = config.scaling.workers
    per_worker = cpus_per_worker(config.scaling, ray.cluster_resources().get("CPU", 1))
    per_epoch, _ = finetune_epoch_size(data_dir, config)
    storage = ensure_writable(storage)
    run_dir = locations.join(storage, name)
    dataset = build_finetune_dataset(data_dir, config_dict, epoch_offset=resume_epoch(run_dir))
    loop_config = {
        "config": config_dict,
        "class_names": names,
        "lut": lut.tolist(),
        "data_dir": str(locations.as_location(data_dir)),
        "val_ids": splits["val"],
        "pretrained": str(pretrained) if pretrained else None,
        "steps_per_epoch": max(1, per_epoch // (config.patches.batch_size * workers)),
        "torch_threads": max(1, int(per_worker)),
        "model_card": model_card,
    }
    folder, metrics, extra = fit_stage(
        finetune_loop, loop_config, config, per_worker, storage, name, callbacks, dataset
    )
    return FinetuneResult(
        folder,
        locations.join(folder, BEST_FILE),
        metrics,
        extra.get("history", []),
        summary,
        name,
        extra.get("hardware"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mixcl_ray.finetune",
        description="Fine-tune a segmentation network on a label fraction of the target task, from "
        "scratch or from pre-trained weights; validation Dice per organ with sliding-window inference.",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="output folder (or object-store URI) of `python -m data_prep prepare`",
    )
    parser.add_argument(
        "--label-fraction",
        required=True,
        type=float,
        help="e.g. 0.05, 0.15 or 1 (from splits.json)",
    )
    parser.add_argument(
        "--pretrained",
        help="pretrained.pt or a pre-training checkpoint folder (a path or object-store URI)",
    )
    parser.add_argument(
        "--storage",
        default="runs",
        help="checkpoint folder or object-store URI such as s3://bucket/runs (default: runs)",
    )
    parser.add_argument("--preset", choices=["cpu-tiny", "paper"], default="cpu-tiny")
    parser.add_argument("--config", type=Path, help="YAML overrides")
    parser.add_argument("--source", help="target source (default: the manifest's target)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--name", help="run name (default: derived from config, so re-runs resume)")
    parser.add_argument("--address", help="Ray address (e.g. auto); default: start Ray locally")
    parser.add_argument(
        "--experiment",
        default="mixcl_ray-finetune",
        help="MLflow experiment (the store: <storage>/mlflow.db, or MLFLOW_TRACKING_URI)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from mixcl_ray.ray_start import init_ray

    args = build_parser().parse_args(argv)
    overrides: dict = {"label_fraction": args.label_fraction}
    if args.source:
        overrides["source"] = args.source
    for key, value, section in (
        ("seed", args.seed, "optim"),
        ("epochs", args.epochs, "optim"),
        ("workers", args.workers, "scaling"),
    ):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    if args.gpu:
        overrides.setdefault("scaling", {})["use_gpu"] = True
    try:
        config = load_config("finetune", args.preset, args.config, overrides)
        storage = ensure_writable(args.storage)
        init_ray(args.address)
        from data_prep.reader import read_manifest
        from mixcl_ray.progress import EpochLines
        from mixcl_ray.run_tracking import StandaloneRun
        from mixcl_ray.trial import trial_params

        method = "pretrained" if args.pretrained else "scratch"
        context = {
            "preset": config.preset,
            "fingerprint": read_manifest(args.data)["input_fingerprint"],
        }
        params = trial_params({"method": method}, None, config, context)
        if args.pretrained:  # what trial_params reads from the pre-training's config
            params["load_decoder"] = config.load_decoder
            params["pretrained_lr_scale"] = config.pretrained_lr_scale
        run_name = f"{method} {100 * config.label_fraction:g}% seed {config.optim.seed}"
        with (
            StandaloneRun("finetune", storage, args.experiment, run_name, params) as run,
            EpochLines("finetune", config.optim.epochs) as lines,
        ):
            result = run_finetuning(
                args.data,
                storage,
                config,
                args.pretrained,
                args.name,
                [lines.callback, *run.callbacks],
            )
            run.finish(
                {
                    "best_checkpoint": describe(result.best_model),
                    "pretrained_weights": describe(args.pretrained) if args.pretrained else "",
                    "load_report": result.load_summary or "",
                    "hardware": result.hardware,
                }
            )
    except (ValueError, OSError) as err:  # OSError: missing files, an object store refused
        print(f"error: {err}", file=sys.stderr)
        return 2
    if result.load_summary:
        print(f"pre-trained weights: {result.load_summary}")
    m = result.metrics
    print(
        json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}, indent=1)
    )
    print(f"trained on: {result.hardware}")
    print(
        f"fine-tuning {result.name} done: best validation Dice {m.get('val/best_dice_mean', float('nan')):.4f}, "
        f"final {m.get('val/dice_mean', float('nan')):.4f}; best weights {describe(result.best_model)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
