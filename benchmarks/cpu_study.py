"""A one-seed CPU study on the built-in benchmark: validation Dice of the spleen target at label
fractions 5 % and 100 % from scratch, and 5 % after MixCL pre-training; with the 2-worker
pre-training's patches/s and data-wait share. Every figure is measured in this run.

    python benchmarks/cpu_study.py [--data data/prepared] [--storage runs/cpu-study] [--seed 0]

The data folder is prepared from the built-in benchmark when it does not exist yet.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mixcl_ray.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--storage", type=Path, default=Path("runs/cpu-study"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-epochs", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=None)
    args = parser.parse_args()

    from data_prep.cli import default_benchmark
    from data_prep.prepare import prepare
    from mixcl_ray.finetune import run_finetuning
    from mixcl_ray.pretrain import run_pretraining
    from mixcl_ray.ray_start import init_ray

    init_ray()
    if not (args.data / "manifest.json").exists():
        prepare([default_benchmark()], args.data)
    pre_over = {"optim": {"seed": args.seed}}
    if args.pretrain_epochs:
        pre_over["optim"]["epochs"] = args.pretrain_epochs
    start = time.perf_counter()
    pre = run_pretraining(args.data, args.storage, load_config("pretrain", overrides=pre_over))
    pre_seconds = time.perf_counter() - start
    rows = []
    for label_fraction, pretrained in ((0.05, None), (1.0, None), (0.05, pre.checkpoint)):
        over = {"label_fraction": label_fraction, "optim": {"seed": args.seed}}
        if args.finetune_epochs:
            over["optim"]["epochs"] = args.finetune_epochs
        t = time.perf_counter()
        result = run_finetuning(
            args.data, args.storage, load_config("finetune", overrides=over), pretrained=pretrained
        )
        rows.append(
            (
                "mixcl" if pretrained else "scratch",
                label_fraction,
                result.metrics,
                time.perf_counter() - t,
            )
        )
    print("\npre-training (MixCL, cpu-tiny, 2 workers):")
    for h in pre.history:
        print(
            f"  epoch {h['epoch']}: loss {h['train/loss']:.3f} (identity {h.get('train/loss_identity', 0):.3f}, "
            f"label {h.get('train/loss_label', 0):.3f}, reconstruction {h.get('train/loss_reconstruction', 0):.3f}), "
            f"{h['train/patches_per_s']:.1f} patches/s, data wait {100 * h['train/data_wait_share']:.1f} %"
        )
    print(f"  wall time {pre_seconds:.0f} s; checkpoint {pre.checkpoint}")
    print("\nfine-tuning, validation split, one seed:")
    print(
        f"  {'method':<8} {'labels':>7} {'best val Dice':>14} {'final val Dice':>15} {'wall s':>7}"
    )
    for method, fraction, m, seconds in rows:
        print(
            f"  {method:<8} {fraction * 100:>6.0f}% {m['val/best_dice_mean']:>14.3f} {m['val/dice_mean']:>15.3f} {seconds:>7.0f}"
        )


if __name__ == "__main__":
    main()
