"""Sweep cost: a search (default: tune_spaces/finetune_search.yaml, the fine-tuning learning
rate of MixCL at 5 % labels on one shared pre-training) with ASHA early stopping and the shared
pre-training cache, against the same search at full budget without them (every trial runs all
its epochs and pre-trains its own model): total Train-worker-seconds (each trial's wall time x
its Train workers), wall time, and whether the same best configuration wins. Both sweeps run
here, one after the other, each as ``python -m mixcl_ray.tune`` in its own process with its
own MLflow store, and both sample the same configurations (``search_seed``, 0 unless the space
sets one); every figure is measured in this run. ``--space demo`` runs the demo's grid, where
every cell is a result and ASHA has little to stop. ASHA's schedule is the space's own
(``finetune_search``: grace period 1, reduction factor 3); the flags override it.

    python benchmarks/sweep_cost.py [--space finetune_search] [--data DIR]
        [--storage runs/sweep-cost] [--grace-period N] [--reduction-factor N]

A trial's wall time runs from the start of its MLflow run (before any pre-training it
triggers) to its end, or, for a trial ASHA stopped, to its last recorded epoch. The best
configuration is the finished trial with the highest final value of the space's metric.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common
import yaml

ROOT = Path(__file__).resolve().parents[1]


def variants(space: dict, grace_period: int, reduction_factor: int) -> dict[str, dict]:
    """The two sweeps: "asha+cache" and "full budget" (no scheduler, no pre-training cache)."""
    experiment = space.get("experiment", "mixcl_ray")
    # both sweeps sample the same configurations (a random search would draw others each time)
    if space.get("search_seed") is None:
        space = {**space, "search_seed": 0}
    return {
        "asha+cache": {
            **space,
            "experiment": f"{experiment}-cost-asha",
            "scheduler": {
                "type": "asha",
                "grace_period": grace_period,
                "reduction_factor": reduction_factor,
            },
            "pretrain_cache": True,
        },
        "full budget": {
            **space,
            "experiment": f"{experiment}-cost-full",
            "scheduler": {"type": "none"},
            "pretrain_cache": False,
        },
    }


def trial_costs(uri: str, experiment: str, metric: str, mode: str) -> dict:
    """Worker-seconds per trial and the best finished configuration, from the MLflow store."""
    from mlflow import MlflowClient

    from mixcl_ray.dimensions import DIMENSIONS

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    trials = client.search_runs([exp.experiment_id], "tags.`mixcl.stage` = 'trial'")
    total, rows, best = 0.0, [], None
    for t in trials:
        end = t.info.end_time
        if t.info.status != "FINISHED":  # stopped by ASHA: its last epoch is its end
            history = client.get_metric_history(t.info.run_id, metric)
            end = max((m.timestamp for m in history), default=t.info.start_time)
        seconds = (end - t.info.start_time) / 1000
        workers = int(t.data.params.get("workers", 1))
        total += seconds * workers
        config = {
            k: t.data.params[k]
            for k in DIMENSIONS  # the searchable params, one name each in spaces and MLflow
            if k in t.data.params
        }
        rows.append((config, t.info.status, seconds, t.data.metrics.get(metric)))
        score = t.data.metrics.get(metric)
        if t.info.status == "FINISHED" and score is not None:
            better = best is None or (score > best[1] if mode == "max" else score < best[1])
            if better:
                best = (config, score)
    return {"worker_seconds": total, "trials": rows, "best": best}


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument(
        "--space", default="finetune_search", help="space file or name in tune_spaces/"
    )
    parser.add_argument("--storage", type=Path, default=Path("runs/sweep-cost"))
    parser.add_argument("--grace-period", type=int, help="ASHA's (default: the space's, else 2)")
    parser.add_argument(
        "--reduction-factor", type=int, help="ASHA's (default: the space's, else 2)"
    )
    args = parser.parse_args(argv)

    from mixcl_ray.spaces import ASHA_DEFAULTS, SPACES_DIR, load_space

    path = Path(args.space)
    if not path.exists():
        path = SPACES_DIR / f"{args.space}.yaml"
    spec = load_space(path)
    data = common.ensure_data(args.data).absolute()
    storage = args.storage.absolute()
    storage.mkdir(parents=True, exist_ok=True)
    asha = {**ASHA_DEFAULTS, **(spec.scheduler if spec.scheduler.get("type") == "asha" else {})}
    grace = args.grace_period or asha["grace_period"]
    reduction = args.reduction_factor or asha["reduction_factor"]
    print(
        f"{common.machine()}; space {path.name}, data {data}; "
        f"ASHA grace {grace}, reduction {reduction}"
    )
    results = {}
    for name, space in variants(yaml.safe_load(path.read_text()), grace, reduction).items():
        folder = storage / name.replace(" ", "-").replace("+", "-")
        folder.mkdir(parents=True, exist_ok=True)
        space_file = folder / f"{spec.name}-{folder.name}.yaml"
        space_file.write_text(yaml.safe_dump(space, sort_keys=False))
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        cmd = [
            sys.executable,
            "-m",
            "mixcl_ray.tune",
            "--space",
            str(space_file),
            "--data",
            str(data),
            "--storage",
            str(folder),
            "--tracking-uri",
            uri,
            "--address",
            "local",
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{name} sweep failed:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}")
        results[name] = {
            "wall": wall,
            **trial_costs(uri, space["experiment"], spec.metric, spec.mode),
        }
        print(
            f"{name}: {wall / 60:.1f} min wall, {results[name]['worker_seconds']:.0f} worker-s",
            flush=True,
        )

    full, fast = results["full budget"], results["asha+cache"]
    print(
        "\n| sweep | wall min | Train-worker-seconds | vs full budget | best configuration | its "
        f"{spec.metric} |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in (("full budget", full), ("asha+cache", fast)):
        ratio = r["worker_seconds"] / full["worker_seconds"]
        config, score = r["best"] or ("-", None)
        print(
            f"| {name} | {r['wall'] / 60:.1f} | {r['worker_seconds']:.0f} | {ratio:.2f}x | "
            f"{json.dumps(config)} | {'-' if score is None else f'{score:.3f}'} |"
        )
    for name, r in results.items():
        print(f"\n{name} trials:")
        for config, status, seconds, score in r["trials"]:
            value = f"{score:.3f}" if score is not None else "-"
            print(f"  {json.dumps(config)} {status} {seconds:.0f} s, {spec.metric} {value}")
    same = bool(full["best"] and fast["best"] and full["best"][0] == fast["best"][0])
    summary = {
        "cost_ratio": fast["worker_seconds"] / full["worker_seconds"],
        "same_best_configuration": same,
    }
    print("\nsummary: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
