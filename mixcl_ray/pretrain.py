"""MixCL pre-training on Ray Train: ``python -m mixcl_ray.pretrain --data OUT --storage DIR``.

Each worker runs ``PretrainStage`` on the training engine (``mixcl_ray.engine``): per epoch it
streams its shard of two-view examples, reports every loss term, patches/s and the share of step
time spent waiting for data, and (rank 0) attaches a checkpoint that holds the pre-trained
weights. Re-running the same command with the same storage resumes an interrupted run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from data_prep import locations
from data_prep.locations import Location, describe
from mixcl_ray.config import PretrainConfig, to_dict
from mixcl_ray.engine import Stage
from mixcl_ray.storage import ensure_writable

PRETRAINED_FILE = "pretrained.pt"


class PretrainStage(Stage):
    """The MixCL loss on two views of each patch; rank 0's checkpoints carry the encoder and
    decoder weights that fine-tuning loads."""

    loss_name = "MixCL"
    ddp_kwargs = {"find_unused_parameters": True}

    def build(self):
        from mixcl_ray.losses import MixCLLoss
        from mixcl_ray.models import MixCLModel

        cfg = self.cfg
        self.generator = torch.Generator().manual_seed(cfg.optim.seed * 1000 + self.rank)
        self.loss_fn = MixCLLoss(cfg.loss)
        self.excess, self.labelled, self.batches = 0.0, 0, 0
        return MixCLModel(cfg.model)

    def loss(self, model, batch, step):
        from mixcl_ray.losses import view_outputs

        out1, out2 = view_outputs(model, self.loss_fn.heads, batch)
        diagnostics = {}
        terms = self.loss_fn(
            out1, out2, batch, step=step, generator=self.generator, diagnostics=diagnostics
        )
        if "label_excess" in diagnostics:
            self.excess += float(diagnostics["label_excess"])
            self.labelled += 1
        self.batches += 1
        return terms["loss"], terms

    def epoch_metrics(self):
        metrics = {}
        if self.cfg.loss.l_label > 0:
            # the label term is 0 on batches without labelled voxels, so its mean alone mixes
            # how often a batch holds labels with how well they are separated
            metrics["train/label_batch_share"] = self.labelled / max(1, self.batches)
            if self.labelled:
                metrics["train/label_excess"] = self.excess / self.labelled
        self.excess, self.labelled, self.batches = 0.0, 0, 0
        return metrics

    def checkpoint_files(self, model):
        from mixcl_ray.models import save_pretrained

        return {PRETRAINED_FILE: lambda p: save_pretrained(model, p, to_dict(self.cfg.model))}


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

    from data_prep.reader import read_manifest
    from mixcl_ray.feed import build_pretrain_dataset, pretraining_cases
    from mixcl_ray.fit import fit_stage
    from mixcl_ray.models import check_patch_size
    from mixcl_ray.train_utils import run_name

    check_patch_size(config.model, config.patches.patch_size)
    manifest = read_manifest(data_dir)
    config_dict = to_dict(config)
    name = name or run_name("pretrain", config_dict, manifest["input_fingerprint"])
    storage = ensure_writable(storage)
    ids, _ = pretraining_cases(data_dir, config.pretrain_label_fraction, config.target_images)
    folder, metrics, extra = fit_stage(
        PretrainStage,
        config,
        patches_per_epoch=len(ids) * config.patches.patches_per_case,
        storage=storage,
        name=name,
        callbacks=callbacks,
        dataset_for=lambda offset: build_pretrain_dataset(data_dir, config, epoch_offset=offset),
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
    from mixcl_ray.commands import add_common_arguments

    parser = argparse.ArgumentParser(
        prog="python -m mixcl_ray.pretrain",
        description="MixCL pre-training on Ray Train (DDP workers fed by Ray Data). Re-running the "
        "same command with the same --storage resumes an interrupted run.",
    )
    add_common_arguments(parser, "pretrain")
    parser.add_argument(
        "--method",
        choices=["mixcl", "identity", "reconstruction", "label"],
        default=None,
        help="a baseline is a setting of the same code: which loss terms are on (mixcl: all "
        "three, see docs/method.md; without --method, the config's loss weights: all three "
        "terms at 1 by default)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from mixcl_ray.commands import run_command
    from mixcl_ray.config import method_weights
    from mixcl_ray.dimensions import pretrain_params

    args = build_parser().parse_args(argv)

    def describe_run(config, fingerprint):
        name = args.name or f"pretrain seed {config.optim.seed}"
        return name, pretrain_params(
            config, args.name or "", preset=config.preset, fingerprint=fingerprint
        )

    result = run_command(
        args,
        "pretrain",
        {"loss": method_weights(args.method)} if args.method else {},
        describe_run,
        lambda config, storage, callbacks: run_pretraining(
            args.data, storage, config, args.name, callbacks=callbacks
        ),
        lambda run, r: {"checkpoint": describe(r.checkpoint), "hardware": r.hardware},
    )
    if result is None:
        return 2
    print(f"pre-training {result.name} done: final checkpoint {describe(result.checkpoint)}")
    print(f"pre-trained weights for fine-tuning: {describe(result.pretrained)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
