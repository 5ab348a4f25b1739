"""Fine-tuning with a label fraction: ``python -m mixcl_ray.finetune --data OUT --label-fraction F``.

Builds the segmentation network, loads pre-trained encoder/decoder weights (reporting what
loaded), trains with MONAI DiceCE on the label-fraction subset that splits.json defines,
validates with sliding-window inference and per-class Dice, and keeps the best checkpoint.
Scratch is the same run without ``--pretrained``: every method gets the same budget.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from data_prep import locations
from data_prep.locations import Location, describe
from mixcl_ray.config import FinetuneConfig, merge, to_dict
from mixcl_ray.engine import Stage, StageJob
from mixcl_ray.train_utils import autocast, gather

BEST_FILE = "best_model.pt"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneJob(StageJob):
    """What every fine-tuning worker gets besides the config."""

    class_names: tuple[str, ...]
    lut: tuple[int, ...]  # the source's label values -> the network's class indices
    data_dir: str
    val_ids: tuple[str, ...]
    pretrained: str | None  # the pre-trained weights' file
    model_card: dict  # what a prediction on a raw scan needs (mixcl_ray.predict)


class FinetuneStage(Stage):
    """DiceCE on the label fraction's patches; sliding-window validation Dice on this rank's
    share of the validation cases, gathered on every rank; rank 0 keeps the best weights (on
    CPU) and writes them into every checkpoint, so the last checkpoint always has them and no
    local checkpoint folder has to outlive its upload."""

    loss_name = "DiceCE"

    def build(self):
        from monai.losses import DiceCELoss

        from data_prep.reader import load_case
        from mixcl_ray.models import SegmentationNet, load_pretrained

        job, cfg = self.job, self.cfg
        model = SegmentationNet(cfg.model, num_classes=len(job.class_names))
        self.load_report = None
        if job.pretrained:
            self.load_report = load_pretrained(model, job.pretrained, parts=cfg.pretrained_parts)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.best, self.best_weights, self.improved = {"dice": -1.0, "epoch": -1}, None, False
        lut = np.asarray(job.lut, dtype=np.uint8)
        self.val_cases = [
            dict(c, label=lut[c["label"]])
            for c in (load_case(job.data_dir, i) for i in job.val_ids[self.rank :: self.world])
        ]
        return model

    def scaled_parameters(self, model):
        parts = self.cfg.scaled_parts(bool(self.job.pretrained))
        return [p for part in parts for p in getattr(model.backbone, part).parameters()], (
            self.cfg.pretrained_lr_scale
        )

    def loss(self, model, batch, step):
        loss = self.loss_fn(model(batch["image"]), batch["label"].long())
        return loss, {"loss": loss}

    def epoch_metrics(self):
        if self.load_report is None:
            return {}
        return {"pretrained/loaded_tensors": len(self.load_report.loaded)}

    def validate(self, model, epoch):
        from mixcl_ray.evaluate import nan_mean, validate_cases

        cfg, names = self.cfg, self.job.class_names
        self.improved = False
        if (epoch + 1) % cfg.val_every and epoch != cfg.optim.epochs - 1:
            return {}
        results = {}
        for part in gather(
            validate_cases(
                model,
                self.val_cases,
                len(names),
                cfg.patches.patch_size,
                self.device,
                cfg.sw_batch_size,
                cfg.sw_overlap,
                autocast(self.device, cfg.scaling.amp),
            )
        ):
            results.update(part)
        per_case = np.stack([results[k] for k in sorted(results)])  # (cases, classes - 1)
        per_class = [nan_mean(per_case[:, c]) for c in range(per_case.shape[1])]
        metrics = {"val/dice_mean": nan_mean(per_class)}
        metrics.update({f"val/dice/{n}": d for n, d in zip(names[1:], per_class, strict=True)})
        self.improved = metrics["val/dice_mean"] > self.best["dice"]
        if self.improved:
            self.best = {"dice": metrics["val/dice_mean"], "epoch": epoch}
            if self.rank == 0:
                weights = model.state_dict()
                self.best_weights = {
                    "model": {k: v.detach().cpu().clone() for k, v in weights.items()},
                    **self.best,
                }
        metrics["val/best_dice_mean"] = self.best["dice"]
        return metrics

    def restore(self, extra, folder):
        self.best = extra["best"]
        if self.rank == 0 and (folder / BEST_FILE).exists():
            self.best_weights = torch.load(
                folder / BEST_FILE, map_location="cpu", weights_only=True
            )

    def checkpoint_extra(self):
        return {"best": self.best}

    def checkpoint_files(self, model):
        if self.best_weights is None:
            return {}
        with_card = {**self.best_weights, "card": self.job.model_card}
        return {BEST_FILE: lambda p: torch.save(with_card, p)}


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
    from mixcl_ray.feed import (
        build_finetune_dataset,
        class_lookup,
        finetune_epoch_size,
        target_source,
    )
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
