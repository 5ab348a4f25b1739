"""Label efficiency on the built-in benchmark: validation and test Dice of the target organ at
5 %, 15 % and 100 % of its labels, for scratch, identity only, label only, reconstruction only
and MixCL, mean ± std over three seeds (the CPU preset), with the check of the target:

    MixCL at 5 % >= scratch at 5 % + 5 Dice points, and >= every single-term baseline at 5 %.

It runs the study ``tune_spaces/label_efficiency.yaml`` with ``python -m mixcl_ray.tune`` (45
fine-tunings, 12 pre-trainings; every fine-tuning trains for as many steps as the 100 % one,
about 5 minutes each, so about 5 hours on two CPU cores; ``--resume`` continues an interrupted
one), then reads the finished trials from MLflow, prints both tables and saves the plot.

    python benchmarks/label_efficiency.py [--storage runs/label-efficiency] [--resume]
    python benchmarks/label_efficiency.py --report-only [--experiment NAME] [--tracking-uri URI]

The baseline, scratch, is measured in the same study; every figure is from this run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parents[1]
TARGET_GAIN = 0.05  # Dice points (0.05 = 5 points) over scratch at the smallest label fraction
SINGLE_TERMS = ("identity", "label", "reconstruction")


def target_check(summary: dict, gain: float = TARGET_GAIN) -> list[str]:
    """Lines that say whether MixCL at the smallest label fraction beats scratch by ``gain`` and
    every single-term baseline (means over seeds); what is missing is said, not guessed."""
    mixcl = summary.get("mixcl", {})
    if not mixcl:
        return ["target: no MixCL result"]
    smallest = min(mixcl)
    ours = mixcl[smallest][0]
    lines = []
    scratch = summary.get("scratch", {}).get(smallest)
    if scratch is None:
        lines.append(f"target vs scratch: no scratch result at {100 * smallest:g} %")
    else:
        met = ours >= scratch[0] + gain
        lines.append(
            f"target vs scratch at {100 * smallest:g} %: MixCL {ours:.3f} vs scratch "
            f"{scratch[0]:.3f} + {gain:.2f} -> {'met' if met else 'not met'} "
            f"(gain {ours - scratch[0]:+.3f})"
        )
    for method in SINGLE_TERMS:
        other = summary.get(method, {}).get(smallest)
        if other is None:
            lines.append(f"target vs {method}: no result at {100 * smallest:g} %")
            continue
        met = ours >= other[0]
        lines.append(
            f"target vs {method} at {100 * smallest:g} %: MixCL {ours:.3f} vs {other[0]:.3f} -> "
            f"{'met' if met else 'not met'}"
        )
    return lines


def report(tracking_uri: str, experiment: str, out_dir: Path) -> None:
    from mixcl_ray.plots import label_efficiency_png
    from mixcl_ray.report import collect, render_table, summarise

    rows, _ = collect(tracking_uri, experiment)
    if not rows:
        raise SystemExit(f"no finished trial in the latest sweep of {experiment!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, name in (("val", "validation"), ("test", "test")):
        summary = summarise(rows, key)
        print()
        if key == "test":
            print("test split, best validation epoch's weights")
        print(render_table(summary, split=name.capitalize()))
        for line in target_check(summary):
            print(f"{name} {line}")
        plot = out_dir / f"label_efficiency_{key}.png"
        label_efficiency_png(summary, plot, f"{name} Dice (mean over organs)")
        print(f"plot: {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--space", default="label_efficiency", help="study space (name or file)")
    parser.add_argument("--storage", type=Path, default=Path("runs/label-efficiency"))
    parser.add_argument("--data", help="prepared folder (default: the built-in benchmark)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted study")
    parser.add_argument(
        "--report-only", action="store_true", help="no study: report the latest one in MLflow"
    )
    parser.add_argument("--experiment", default="mixcl_ray-label-efficiency")
    parser.add_argument("--tracking-uri", help="default: the SQLite store in --storage")
    args = parser.parse_args()
    from mixcl_ray import tracking

    uri = args.tracking_uri or tracking.default_tracking_uri(args.storage)
    print(common.machine())
    if not args.report_only:
        command = [sys.executable, "-m", "mixcl_ray.tune", "--space", args.space]
        command += ["--storage", str(args.storage), "--tracking-uri", uri]
        command += ["--data", args.data] if args.data else []
        command += ["--resume"] if args.resume else []
        hint = f"continue with: python benchmarks/label_efficiency.py --storage {args.storage} --resume"
        common.run_sweep(command, hint, cwd=ROOT)
    report(uri, args.experiment, args.storage / "label-efficiency-report")


if __name__ == "__main__":
    main()
