"""Label efficiency on the built-in benchmark: validation and test Dice of the target organ at
5 %, 15 % and 100 % of its labels, for scratch, identity only, label only, reconstruction only
and MixCL, mean ± std over three seeds (the CPU preset), with the check of the target:

    MixCL at 5 % >= scratch at 5 % + 5 Dice points, and >= every single-term baseline at 5 %.

It runs the study ``tune_spaces/label_efficiency.yaml`` with ``python -m mixcl_ray.tune`` (45
fine-tunings, 12 pre-trainings; every fine-tuning trains for as many steps as the 100 % one,
about 5 minutes each, so about 5 hours on two CPU cores; ``--resume`` continues an interrupted
one), then reads the finished trials from MLflow, prints both tables and saves the plot.

    python benchmarks/label_efficiency.py [--storage runs/label-efficiency] [--resume]
    python benchmarks/label_efficiency.py --seeds 0 [--resume]     # one seed: 15 cells, ~1h40
    python benchmarks/label_efficiency.py --seeds 2 --methods scratch label   # part of a seed
    python benchmarks/label_efficiency.py --methods identity --fractions 0.05  # target cells
    python benchmarks/label_efficiency.py --space label_efficiency_slow_encoder --seeds 0
    python benchmarks/label_efficiency.py --report-only [--experiment NAME] [--tracking-uri URI]

The study spans sessions and machines: ``--seeds`` runs part of the seed grid as its own sweep,
and every finished cell (method, label fraction, seed: validation and test Dice, the commit)
is recorded in ``--results`` (default ``benchmarks/results/label_efficiency.json``, kept in the
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

from data_prep import locations

ROOT = Path(__file__).resolve().parents[1]
TARGET_GAIN = 0.05  # Dice points (0.05 = 5 points) over scratch at the smallest label fraction
SINGLE_TERMS = ("identity", "label", "reconstruction")
RESULTS = ROOT / "benchmarks" / "results" / "label_efficiency.json"


def space_file(space: str) -> Path:
    from mixcl_ray.spaces import space_path

    return space_path(space)


def settings_key(space: Path, data: str | None) -> str:
    """What makes two studies' cells comparable: the space without its seed grid and its
    description, and the data; a short hash of it."""
    spec = yaml.safe_load(space.read_text())
    spec.pop("description", None)
    spec.get("space", {}).pop("seed", None)
    spec["data"] = data or spec.get("data")
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def grid_values(value) -> list:
    """A space dimension's values: its grid, or the one value it is fixed at."""
    return value["grid"] if isinstance(value, dict) else [value]


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


def results_file(space: Path) -> Path:
    """Where a study's cells are recorded by default: ``RESULTS`` for the study, a file named
    after any other space (its own table, its own settings)."""
    if space.resolve() == space_file("label_efficiency").resolve():
        return RESULTS
    return RESULTS.parent / f"{space.stem}.json"


def space_option(space: Path) -> str:
    """`` --space NAME`` for a space other than the study, "" for the study: what a printed
    command needs to run the same space again."""
    from mixcl_ray.spaces import SPACES_DIR

    if results_file(space) == RESULTS:
        return ""
    shipped = space.resolve().parent == SPACES_DIR.resolve()
    return f" --space {space.stem if shipped else space}"


def method_weights(method: str) -> list[float]:
    """The loss weights (l_id, l_label, l_rec) ``method`` pre-trains with now; zeros for
    scratch, as its trials log them."""
    from mixcl_ray.config import METHODS

    return [float(w) for w in METHODS[method] or (0.0, 0.0, 0.0)]


def split_by_weights(cells: list[dict]) -> tuple[list[dict], list[dict]]:
    """(cells pre-trained with their method's weights of now, the others): a cell recorded
    before its method's weights changed, or without weights, is not comparable."""
    current, other = [], []
    for cell in cells:
        same = cell.get("weights") == method_weights(cell["method"])
        (current if same else other).append(cell)
    return current, other


def read_results(path: Path, experiment: str, key: str) -> tuple[list[dict], list[dict]]:
    """(cells, superseded cells) of the file for ``experiment``, as recorded; ([], []) when
    there are none. A file recorded with other settings is an error that says so (its cells are
    not comparable)."""
    if not path.exists():
        return [], []
    try:
        saved = json.loads(path.read_text())
        cells, saved_key = saved["cells"], saved["settings"]
        superseded = saved.get("superseded", [])
    except (ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a label-efficiency results file ({err})") from None
    if saved.get("experiment") != experiment:
        return [], []
    if saved_key != key:
        raise SystemExit(
            f"{path}: its {len(cells)} cells were recorded with other study settings "
            f"({saved_key}, now {key}); move it away to start a new table, or give --results"
        )
    return cells, superseded


def load_results(path: Path, experiment: str, key: str) -> list[dict]:
    """The cells recorded for ``experiment`` with these settings and their methods' weights of
    now; [] when there are none. The cells of other weights are left out, and said so."""
    current, other = split_by_weights(read_results(path, experiment, key)[0])
    if other:
        print(
            f"{path}: {len(other)} cells left out, recorded with other pre-training weights "
            f"than their method's now ({weights_changed(other)}); they stay in the file "
            "(under 'superseded' once new cells are recorded)"
        )
    return current


def weights_changed(cells: list[dict]) -> str:
    """``method l_id/l_label/l_rec W, now W``, once per method and recorded weights."""
    pairs = {(c["method"], tuple(c.get("weights") or ())) for c in cells}

    def text(weights) -> str:
        return "/".join(f"{w:g}" for w in weights) if weights else "not recorded"

    return ", ".join(
        f"{m} l_id/l_label/l_rec {text(w)}, now {text(method_weights(m))}" for m, w in sorted(pairs)
    )


def merge_cells(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with ``new`` added; a cell run again (same method, label fraction and seed)
    replaces the recorded one. Sorted by seed, method, label fraction."""
    cells = {(c["method"], float(c["label_fraction"]), str(c["seed"])): c for c in old + new}
    return sorted(cells.values(), key=lambda c: (str(c["seed"]), c["method"], c["label_fraction"]))


def record(
    path: Path, experiment: str, key: str, rows: list[dict], commit: str | None = None
) -> list[dict]:
    """Merge the sweep's finished cells into the results file (written atomically), each
    with the code it ran: the commit its trial run was tagged with (the sweep driver's, so a
    resumed study's cells keep theirs), else ``commit`` (taken when the study started).
    Returns every cell."""
    new = [
        {
            "method": r["method"],
            "label_fraction": r["label_fraction"],
            "seed": str(r["seed"]),
            "val": r["val"],
            "test": r["test"],
            "run_id": r["run_id"],
            "commit": r.get("commit") or commit,
            "weights": r.get("weights"),
            "hardware": r.get("hardware"),
            "data_fingerprint": r.get("data_fingerprint"),
        }
        for r in rows
    ]
    if path.exists() and json.loads(path.read_text()).get("experiment") != experiment:
        raise SystemExit(f"{path} holds another experiment's cells; give --results")
    saved, superseded = read_results(path, experiment, key)
    saved, aside = split_by_weights(saved)
    cells, other = split_by_weights(merge_cells(saved, new))
    payload = {"experiment": experiment, "settings": key, "cells": cells}
    # nothing recorded is dropped: the cells of other weights are kept aside
    superseded += [c for c in aside + other if c not in superseded]
    if superseded:
        payload["superseded"] = superseded
    locations.write_text(path, json.dumps(payload, indent=1) + "\n")
    return cells


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


def missing_cells(space: Path, cells: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Seed -> method -> the space's label fractions of that method and seed that are not
    recorded (complete methods and seeds left out)."""
    from mixcl_ray.spaces import load_space

    grid = load_space(space).space
    done = {(c["method"], float(c["label_fraction"]), str(c["seed"])) for c in cells}
    out: dict[str, dict[str, list[float]]] = {}
    fractions = [float(f) for f in grid_values(grid["label_fraction"])]
    for seed in grid_values(grid["seed"]):
        for method in grid_values(grid["method"]):
            left = [f for f in fractions if (method, f, str(seed)) not in done]
            if left:
                out.setdefault(str(seed), {})[method] = left
    return out


def missing_commands(space: Path, missing: dict[str, dict[str, list[float]]]) -> list[str]:
    """The commands that run what ``missing_cells`` found, and nothing recorded again: the
    methods of a seed that miss the same label fractions together, seeds that miss the same
    together; ``--methods`` and ``--fractions`` only where part of the grid is done."""
    from mixcl_ray.spaces import load_space

    grid = load_space(space).space
    every = grid_values(grid["method"])
    all_fractions = [float(f) for f in grid_values(grid["label_fraction"])]
    groups: dict[tuple[tuple[str, ...], tuple[float, ...]], list[str]] = {}
    for seed, methods in missing.items():
        alike: dict[tuple[float, ...], list[str]] = {}
        for method in every:
            if method in methods:
                alike.setdefault(tuple(methods[method]), []).append(method)
        for fractions, names in alike.items():
            groups.setdefault((tuple(names), fractions), []).append(seed)
    study = space_option(space)
    commands = []
    for (methods, fractions), seeds in groups.items():
        command = f"python benchmarks/label_efficiency.py{study} --seeds {' '.join(seeds)}"
        if list(methods) != every:
            command += f" --methods {' '.join(methods)}"
        if list(fractions) != all_fractions:
            command += f" --fractions {' '.join(f'{f:g}' for f in fractions)}"
        commands.append(command)
    return commands


def latest_rows(tracking_uri: str, experiment: str, since: float | None = None) -> list[dict]:
    """The finished cells of the experiment's latest sweep; [] when there is none, or when it
    started before ``since`` (seconds since the epoch: a study that failed before its sweep
    began has no cells of its own)."""
    from mixcl_ray import tracking
    from mixcl_ray.report import collect

    try:
        rows, parent_id = collect(tracking_uri, experiment)
    except ValueError:  # no such experiment or no sweep yet
        return []
    if since is not None:
        started = tracking._client(tracking_uri).get_run(parent_id).info.start_time
        if started < since * 1000:
            return []
    return rows


def report(rows: list[dict], out_dir: Path) -> None:
    from mixcl_ray.plots import label_efficiency_png
    from mixcl_ray.report import hardware_line, render_table, summarise

    out_dir.mkdir(parents=True, exist_ok=True)
    print(hardware_line(rows))
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
    report(cells, args.storage / "label-efficiency-report")
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
