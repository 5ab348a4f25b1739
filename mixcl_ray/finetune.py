"""Fine-tuning with a label fraction: ``python -m mixcl_ray.finetune --data OUT --label-fraction F``.

Builds the segmentation network, loads pre-trained encoder/decoder weights (reporting what
loaded), trains with MONAI DiceCE on the label-fraction subset that splits.json defines, under
one protocol (augmented patches, the loaded parts held then ramped in, a moving average of the
weights validated with sliding-window inference and per-class Dice and kept; docs/method.md).
Scratch is the same run without ``--pretrained``: every method gets the same budget and schedule.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from data_prep import locations
from data_prep.locations import Location, describe
from mixcl_ray.config import FinetuneConfig, merge, to_dict
from mixcl_ray.finetune_stage import BEST_FILE, FinetuneJob, FinetuneStage


@dataclass
class FinetuneResult:
    checkpoint: Location
    best_model: Location
    metrics: dict
    history: list[dict]
    load_summary: str | None
    name: str
    hardware: str | None = None  # what rank 0 trained on (None: a checkpoint from before)
    card: dict | None = None  # the model card written with the best weights


def run_finetuning(
    data_dir,
    storage,
    config: FinetuneConfig,
    pretrained=None,
    name: str | None = None,
    callbacks: list | None = None,
) -> FinetuneResult:
    """Fine-tune with Ray Train (Ray must be initialised); resumes a run of the same name."""

    from data_prep.reader import read_manifest, read_splits
    from mixcl_ray.feed import target_source
    from mixcl_ray.finetune_feed import build_finetune_dataset, class_lookup, finetune_epoch_size
    from mixcl_ray.fit import fit_stage
    from mixcl_ray.models import SegmentationNet, check_patch_size, load_pretrained
    from mixcl_ray.pretrain import PRETRAINED_FILE
    from mixcl_ray.train_utils import run_name

    check_patch_size(config.model, config.patches.patch_size)
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
        with torch.device("meta"):  # keys and shapes only: nothing allocated, nothing copied
            network = SegmentationNet(config.model, len(names))
        parts = config.pretrained_parts
        summary = load_pretrained(network, pretrained, parts=parts, copy=False).summary()
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
    folder, metrics, extra = fit_stage(
        FinetuneStage,
        config,
        patches_per_epoch=finetune_epoch_size(data_dir, config)[0],
        storage=storage,
        name=name,
        callbacks=callbacks,
        dataset_for=lambda offset: build_finetune_dataset(data_dir, config, epoch_offset=offset),
        job_cls=FinetuneJob,
        class_names=tuple(names),
        lut=tuple(int(v) for v in lut),
        data_dir=str(locations.as_location(data_dir)),
        val_ids=tuple(splits["val"]),
        pretrained=str(pretrained) if pretrained else None,
        model_card=model_card,
    )
    return FinetuneResult(
        folder,
        locations.join(folder, BEST_FILE),
        metrics,
        extra.get("history", []),
        summary,
        name,
        extra.get("hardware"),
        model_card,
    )


def build_parser() -> argparse.ArgumentParser:
    from mixcl_ray.commands import add_common_arguments

    parser = argparse.ArgumentParser(
        prog="python -m mixcl_ray.finetune",
        description="Fine-tune a segmentation network on a label fraction of the target task, "
        "from scratch or from pre-trained weights; validation Dice per organ with sliding-window "
        "inference. Re-running the same command with the same --storage resumes.",
    )
    add_common_arguments(parser, "finetune", storage_default="runs")
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
    parser.add_argument("--source", help="target source (default: the manifest's target)")
    parser.add_argument(
        "--register", metavar="NAME", help="register the model in MLflow's model registry"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from mixcl_ray.commands import run_command
    from mixcl_ray.dimensions import trial_params

    args = build_parser().parse_args(argv)
    method = "pretrained" if args.pretrained else "scratch"
    models: dict = {}  # the logged MLflow model's URI

    def close(run, r):  # the run's MLflow model and closing tags
        models["uri"] = run.log_model(r.best_model, r.card, args.register)
        return {
            "best_checkpoint": describe(r.best_model),
            "pretrained_weights": describe(args.pretrained) if args.pretrained else "",
            "load_report": r.load_summary or "",
            "hardware": r.hardware,
            "model_uri": models["uri"] or "",
        }

    def describe_run(config, fingerprint):
        name = f"{method} {100 * config.label_fraction:g}% seed {config.optim.seed}"
        return name, trial_params(
            {"method": method},
            None,
            config,
            preset=config.preset,
            fingerprint=fingerprint,
            pretrained=bool(args.pretrained),
        )

    result = run_command(
        args,
        "finetune",
        {"label_fraction": args.label_fraction, **({"source": args.source} if args.source else {})},
        describe_run,
        lambda config, storage, callbacks: run_finetuning(
            args.data, storage, config, args.pretrained, args.name, callbacks
        ),
        close,
    )
    if result is None:
        return 2
    if models.get("uri"):
        print(f"model URI: {models['uri']}")
    if result.load_summary:
        print(f"pre-trained weights: {result.load_summary}")
    m = result.metrics
    print(
        f"fine-tuning {result.name} done: best validation Dice "
        f"{m.get('val/best_dice_mean', float('nan')):.4f}, final "
        f"{m.get('val/dice_mean', float('nan')):.4f}; best weights {describe(result.best_model)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
