"""Label efficiency on the built-in benchmark: validation and test Dice of the target organ at
5 %, 15 % and 100 % of its labels, for scratch, identity only, label only, reconstruction only
and MixCL, over labelled subsets and seeds (the CPU preset); each method's paired difference to
scratch (same subset, same seed) with a 95 % interval (``mixcl_ray.paired``), and the targets,
each read from a paired interval:

    MixCL at 5 %: scratch + 5 Dice points or more, the interval's lower end above 0, and ahead
    of every single-term method; at 15 % ahead of scratch; at 100 % the lower end -2 points or
    higher.

It runs the study ``tune_spaces/label_efficiency.yaml`` with ``python -m mixcl_ray.tune`` (on the
``study`` benchmark: 90 fine-tunings, 5 methods x 3 fractions x 3 labelled subsets x 2 seeds, and
8 pre-trainings; every fine-tuning trains for as many steps as the 100 % one, about 4.5 minutes
each, so about 7 hours on two CPU cores; ``--resume`` continues an interrupted one), then reads
the finished trials from MLflow, prints the tables and saves the plot of the paired differences
next to the results file (``label_efficiency.png``; with ``--report-only``, in the report's
folder under ``--storage``).

    python benchmarks/label_efficiency.py [--storage runs/label-efficiency] [--resume]
    python benchmarks/label_efficiency.py --seeds 0 [--resume]     # one seed: 45 cells, ~3h30
    python benchmarks/label_efficiency.py --seeds 1 --methods scratch label   # part of a seed
    python benchmarks/label_efficiency.py --methods identity --fractions 0.05  # target cells
    python benchmarks/label_efficiency.py --space label_efficiency_slow_encoder --seeds 0
    python benchmarks/label_efficiency.py --report-only [--experiment NAME] [--tracking-uri URI]

The study spans sessions and machines: ``--seeds`` runs part of the seed grid as its own sweep,
and every finished cell (method, label fraction, labelled subset, seed: validation and test
Dice, test Dice per case, the commit) is recorded in ``--results``, with the paired summary (default ``benchmarks/results/label_efficiency.json``, kept in the
repository; another study space, such as ``label_efficiency_slow_encoder``, has its own file
named after it). The tables are drawn from that file merged with the latest sweep, so the seeds
run on different days add up; a file recorded with other study settings is refused, not
mixed. Every cell also records its pre-training's loss weights (l_id, l_label, l_rec): a cell
whose method pre-trains with other weights now (MixCL's default changed) is left out of the
tables and kept in the file under ``superseded``, and the closing hint asks for it again. The
baseline, scratch, is measured in the same study.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import common
import yaml
from study_results import (
    RESULTS,
    grid_values,
    load_results,
    merge_cells,
    missing_cells,
    missing_commands,
    record,
    results_file,
    space_file,
    space_option,
    split_by_weights,
    target_lines,
)

from data_prep import locations

ROOT = Path(__file__).resolve().parents[1]


def settings_key(space: Path, data: str | None) -> str:
    """What makes two studies' cells comparable: the space without its seed grid and its
    description, and the data; a short hash of it."""
    spec = yaml.safe_load(space.read_text())
    spec.pop("description", None)
    spec.get("space", {}).pop("seed", None)
    spec["data"] = data or spec.get("data")
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def seed_space(
    space: Path,
    seeds: list[int] | None,
    out_dir: Path,
    methods: list[str] | None = None,
    fractions: list[float] | None = None,
) -> Path:
    """A copy of the study space whose seed grid is ``seeds`` (and, given ``methods`` or
    ``fractions``, whose method or label-fraction grid is those): a sweep of its own, resumable
    on its own (the sweep's name is the file's name)."""
    spec = yaml.safe_load(space.read_text())
    grid = spec["space"]
    if seeds:
        grid["seed"] = {"grid": seeds}
    name = f"{space.stem}-seeds-{'-'.join(str(s) for s in grid_values(grid['seed']))}"
    if methods:
        study = grid_values(grid["method"])
        unknown = sorted(set(methods) - set(study))
        if unknown:
            raise SystemExit(f"{space}: no method {', '.join(unknown)} in its grid {study}")
        grid["method"] = {"grid": methods}
        name += "-" + "-".join(methods)
    if fractions:
        study = [float(f) for f in grid_values(grid["label_fraction"])]
        unknown = sorted(set(fractions) - set(study))
        if unknown:
            raise SystemExit(
                f"{space}: no label fraction {', '.join(f'{f:g}' for f in unknown)} in its grid "
                f"{study}"
            )
        grid["label_fraction"] = {"grid": fractions}
        name += "-labels-" + "-".join(f"{100 * f:g}pc" for f in fractions)
    out = out_dir / f"{name}.yaml"
    locations.write_text(out, yaml.safe_dump(spec, sort_keys=False))
    return out


def latest_rows(tracking_uri: str, experiment: str, since: float | None = None) -> list[dict]:
    """The finished cells of the experiment's latest sweep; [] when there is none, or when it
    started before ``since`` (seconds since the epoch: a study that failed before its sweep
    began has no cells of its own)."""
    from mixcl_ray import tracking
    from mixcl_ray.report import collect, with_per_case

    try:
        rows, parent_id = collect(tracking_uri, experiment)
    except ValueError:  # no such experiment or no sweep yet
        return []
    if since is not None:
        started = tracking._client(tracking_uri).get_run(parent_id).info.start_time
        if started < since * 1000:
            return []
    arms = sorted({r["method"] for r in rows if r["method"] != r["base_method"]})
    if arms:  # each cell's weights are its method's: a sweep over other settings has arms
        raise SystemExit(
            f"the latest sweep of {experiment!r} varies more than method, label fraction, subset "
            f"and seed (arms: {', '.join(arms)}): this benchmark records one arm per method; "
            f"report that sweep with python -m mixcl_ray.report --experiment {experiment}"
        )
    return with_per_case(tracking_uri, rows)


def report(cells: list[dict], out_dir: Path, plot: Path) -> None:
    """The tables (means ± std of validation and test Dice), the paired comparison to scratch
    with its intervals, the targets, and the plot of the paired differences at ``plot``."""
    from mixcl_ray import paired
    from mixcl_ray.plots import label_efficiency_png, paired_png
    from mixcl_ray.report import hardware_line, render_table, summarise

    out_dir.mkdir(parents=True, exist_ok=True)
    print(hardware_line(cells))
    for key, name in (("val", "validation"), ("test", "test")):
        summary = summarise(cells, key)
        print()
        print(render_table(summary, split=name.capitalize()))
        label_efficiency_png(summary, out_dir / f"label_efficiency_{key}.png", f"{name} Dice")
    entries = paired.summary(cells)
    print()
    print(paired.render(entries))
    print()
    print("\n".join(target_lines(cells)))
    paired_png(entries, plot)
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
        "--seeds", type=int, nargs="+", help="run only these seeds of the space's seed grid"
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        help="run only these methods of the space's method grid (e.g. the baselines of a new "
        "seed while MixCL's settings are still being decided)",
    )
    parser.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        help="run only these label fractions of the space's grid (e.g. 0.05: the target's cells)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="file of every finished cell, merged across runs (default: "
        f"{RESULTS.relative_to(ROOT)} for the study, benchmarks/results/<space>.json for another "
        "space)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="no study: report the latest one in MLflow"
    )
    parser.add_argument("--experiment", help="MLflow experiment (default: the space's)")
    parser.add_argument("--tracking-uri", help="default: the SQLite store in --storage")
    args = parser.parse_args()
    from mixcl_ray import tracking
    from mixcl_ray.spaces import load_space

    uri = args.tracking_uri or tracking.default_tracking_uri(args.storage)
    print(common.machine())
    space = space_file(args.space)
    args.experiment = args.experiment or load_space(space).experiment
    args.results = args.results or results_file(space)
    key = settings_key(space, args.data)
    cells = load_results(args.results, args.experiment, key)  # refuses other settings up front
    if not args.report_only:
        commit, began = tracking.code_version(), time.time()
        if args.seeds or args.methods or args.fractions:
            space = seed_space(space, args.seeds, args.storage, args.methods, args.fractions)
        command = [sys.executable, "-m", "mixcl_ray.tune", "--space", str(space)]
        command += ["--storage", str(args.storage), "--tracking-uri", uri]
        command += ["--data", args.data] if args.data else []
        command += ["--resume"] if args.resume else []
        seeds = f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else ""
        seeds += f" --methods {' '.join(args.methods)}" if args.methods else ""
        seeds += (
            f" --fractions {' '.join(f'{f:g}' for f in args.fractions)}" if args.fractions else ""
        )
        study = space_option(space_file(args.space))
        hint = (
            f"continue with: python benchmarks/label_efficiency.py{study} --storage {args.storage}"
            f"{seeds} --resume"
        )
        try:
            common.run_sweep(command, hint, cwd=ROOT)
        finally:  # an interrupted or failed study keeps the cells it finished
            # a resumed sweep keeps its first start; a new one must have begun in this run
            rows = latest_rows(uri, args.experiment, since=None if args.resume else began)
            if rows:
                cells = record(args.results, args.experiment, key, rows, commit)
                print(
                    f"{len(rows)} finished cells recorded in {args.results} ({len(cells)} in all)"
                )
    else:
        cells = merge_cells(cells, split_by_weights(latest_rows(uri, args.experiment))[0])
    if not cells:
        raise SystemExit(f"no finished trial of {args.experiment!r} in MLflow or {args.results}")
    out_dir = args.storage / "label-efficiency-report"
    # the study's plot goes beside its results file; a report of MLflow alone writes nothing there
    plot = (
        out_dir / "label_efficiency.png" if args.report_only else args.results.with_suffix(".png")
    )
    report(cells, out_dir, plot)
    full = space_file(args.space)
    missing = missing_cells(full, cells)
    if missing and load_space(full).experiment == args.experiment:
        counts = ", ".join(
            f"seed {s} ({sum(map(len, m.values()))} cells)" for s, m in missing.items()
        )
        print(f"\nnot yet run: {counts}; run them with:")
        for command in missing_commands(full, missing):
            print(f"  {command}")


if __name__ == "__main__":
    main()
