"""What the two stage commands (``python -m mixcl_ray.pretrain`` and ``python -m
mixcl_ray.finetune``) share: their common flags, one way to turn flags into config overrides,
and the run itself (Ray, an MLflow run, a line per epoch; an error is one line and exit code 2,
see ``run_command``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixcl_ray.config import PRESETS, deep_merge


def add_common_arguments(parser: argparse.ArgumentParser, stage: str, storage_default=None):
    """The flags every stage command has. ``storage_default`` None: --storage is required."""
    parser.add_argument(
        "--data",
        required=True,
        help="output folder (or object-store URI) of `python -m data_prep prepare`",
    )
    parser.add_argument(
        "--storage",
        required=storage_default is None,
        default=storage_default,
        help="folder for checkpoints: local, a filesystem every node mounts, or an object-store "
        "URI such as s3://bucket/runs"
        + (f" (default: {storage_default})" if storage_default else ""),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument(
        "--config", type=Path, help="YAML overrides, e.g. {optim: {epochs: 20, lr: 5.0e-4}}"
    )
    parser.add_argument("--seed", type=int, help="optim.seed (default: the config's)")
    parser.add_argument("--epochs", type=int, help="optim.epochs (default: the config's)")
    parser.add_argument("--workers", type=int, help="Ray Train workers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast")
    parser.add_argument(
        "--name", help="run name (default: derived from config and data, so re-runs resume)"
    )
    parser.add_argument("--address", help="Ray address (e.g. auto); default: start Ray locally")
    parser.add_argument(
        "--experiment",
        default=f"mixcl_ray-{stage}",
        help="MLflow experiment (the store: <storage>/mlflow.db, or MLFLOW_TRACKING_URI)",
    )


def overrides(args, extra: dict | None = None) -> dict:
    """The config overrides the common flags ask for, with a stage's own (``extra``) on top."""
    over: dict = {}
    for key, section in (("seed", "optim"), ("epochs", "optim"), ("workers", "scaling")):
        if getattr(args, key) is not None:
            over.setdefault(section, {})[key] = getattr(args, key)
    if args.gpu:
        over.setdefault("scaling", {})["use_gpu"] = True
    return deep_merge(over, extra or {})


def run_command(args, stage: str, extra: dict, describe_run, fit, tags):
    """Load the stage's config (preset, --config, flags), start Ray, and fit inside an MLflow
    run that prints a line per epoch. ``describe_run(config, fingerprint)`` -> (run name,
    params); ``fit(config, storage, callbacks)`` -> the stage's result; ``tags(run, result)``
    -> the run's closing tags (``run``: its ``StandaloneRun``). Returns the result, or None once the error has been printed."""
    from data_prep.reader import read_manifest
    from mixcl_ray.config import load_config
    from mixcl_ray.progress import EpochLines
    from mixcl_ray.ray_start import init_ray
    from mixcl_ray.run_tracking import StandaloneRun
    from mixcl_ray.storage import ensure_writable

    try:
        config = load_config(stage, args.preset, args.config, overrides(args, extra))
        storage = ensure_writable(args.storage)
        init_ray(args.address)
        name, params = describe_run(config, read_manifest(args.data)["input_fingerprint"])
        with (
            StandaloneRun(stage, storage, args.experiment, name, params) as run,
            EpochLines(stage, config.optim.epochs) as lines,
        ):
            result = fit(config, storage, [lines.callback, *run.callbacks])
            run.finish(tags(run, result))
    except (ValueError, OSError) as err:  # OSError: missing files, an object store refused
        print(f"error: {err}", file=sys.stderr)
        return None
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()}
    print(json.dumps(rounded, indent=1))
    print(f"trained on: {result.hardware}")
    return result
