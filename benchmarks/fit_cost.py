"""Where a study cell's fine-tuning spends its time: Ray start, fit start (the driver's call to the
workers' first line), worker setup (model, optimiser, resume, validation cases), waiting for
data, training steps, validation, checkpointing (saving and reporting) and teardown (the last
report to the driver's return). Every share is of the whole, measured in this run.

    python benchmarks/fit_cost.py [--data DIR] [--space demo] [--label-fraction 1.0] [--epochs N]

The fine-tuning is the one a trial of ``--space`` runs (its preset, workers and fine-tuning
settings; scratch, seed 0). The workers time their own phases (the ``time/`` metrics every
fine-tuning reports per epoch); the driver times Ray's start and the fit's call. "Fixed" is what
does not grow with the epochs: Ray start, fit start, worker setup and teardown.
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import date
from pathlib import Path

import common

RESULTS = Path(__file__).resolve().parent / "results" / "fit_cost.json"
FIXED = ("ray start", "fit start", "worker setup", "teardown")


def phases(history: list[dict], last: dict, fit_call: float, fit_return: float) -> dict:
    """Seconds per phase of one fit from its per-epoch ``time/`` metrics (rank 0's): ``history``
    as the fit returned it, ``last`` the last epoch's full metrics (its save and report times
    are taken after its checkpoint was written)."""
    epochs = [*history[:-1], {**history[-1], **last}]
    first = epochs[0]
    train = sum(e["time/train_s"] for e in epochs)
    wait = sum(e["time/data_wait_s"] for e in epochs)
    out = {
        "fit start": first["time/loop_start"] - fit_call,
        "worker setup": first["time/setup_s"],
        "data wait": wait,
        "training steps": train - wait,
        "validation": sum(e["time/val_s"] for e in epochs),
        "checkpointing": sum(e.get("time/save_s", 0) + e["time/prev_report_s"] for e in epochs),
        "teardown": fit_return - epochs[-1]["time/epoch_end"],
    }
    out["between phases"] = (fit_return - fit_call) - sum(out.values())
    return out


def epoch_steps(history: list[dict], last: dict) -> list[float]:
    """Each epoch's training steps (rank 0's seconds, data wait left out)."""
    epochs = [*history[:-1], {**history[-1], **last}]
    return [e["time/train_s"] - e["time/data_wait_s"] for e in epochs]


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--space", default="demo", help="the study whose cell is measured")
    parser.add_argument("--label-fraction", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, help="default: the space's fine-tuning epochs")
    parser.add_argument("--workers", type=int, help="default: the space's workers")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()
    print(common.machine(), flush=True)

    from mixcl_ray.config import deep_merge, load_config
    from mixcl_ray.finetune import run_finetuning
    from mixcl_ray.ray_start import init_ray
    from mixcl_ray.spaces import load_space

    spec = load_space(args.space)
    data = common.ensure_data(args.data or spec.data)  # the study's own data by default
    overrides = deep_merge(
        spec.finetune,
        {
            "label_fraction": args.label_fraction,
            "scaling": {"workers": args.workers or int(spec.resources.get("workers", 1))},
            **({"optim": {"epochs": args.epochs}} if args.epochs else {}),
        },
    )
    config = load_config("finetune", spec.preset, overrides=overrides)
    start = time.time()
    init_ray()
    ray_start = time.time() - start
    with tempfile.TemporaryDirectory(prefix="fit-cost-") as storage:
        fit_call = time.time()
        result = run_finetuning(data, storage, config, name="fit-cost")
        fit_return = time.time()
    seconds = {
        "ray start": ray_start,
        **phases(result.history, result.metrics, fit_call, fit_return),
    }
    total = sum(seconds.values())
    fixed = sum(seconds[k] for k in FIXED)
    print(
        f"one fine-tuning: {config.optim.epochs} epochs, {config.scaling.workers} workers, "
        f"label fraction {args.label_fraction}, preset {spec.preset}"
    )
    for name, value in seconds.items():
        print(f"  {name:<16}{value:8.1f} s {100 * value / total:6.1f} %")
    print(f"  {'total':<16}{total:8.1f} s; fixed {fixed:.1f} s ({100 * fixed / total:.1f} %)")
    per_epoch = epoch_steps(result.history, result.metrics)
    print("  training steps per epoch (s): " + ", ".join(f"{s:.1f}" for s in per_epoch))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python benchmarks/fit_cost.py "
        f"--space {args.space} --label-fraction {args.label_fraction}"
        + (f" --epochs {args.epochs}" if args.epochs else "")
        + (f" --workers {args.workers}" if args.workers else ""),
        "machine": common.machine(),
        "date": date.today().isoformat(),
        "epochs": config.optim.epochs,
        "workers": config.scaling.workers,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "total_s": round(total, 2),
        "fixed_share": round(fixed / total, 4),
        "training_steps_per_epoch_s": [round(s, 2) for s in per_epoch],
        "val_dice_mean": result.metrics.get("val/best_dice_mean"),
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
