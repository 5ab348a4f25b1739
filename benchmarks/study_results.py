"""The label-efficiency study's results file: every finished cell (method, label fraction,
labelled subset, seed: validation and test Dice, test Dice per case, the commit, the hardware,
the pre-training's loss weights) of one study space and its settings, merged across runs,
sessions and machines; each method's loss weights and the paired summary (each method's mean
difference to scratch with its 95 % interval); and the commands that run the cells still
missing. Used by ``label_efficiency.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep import locations

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "label_efficiency.json"


def space_file(space: str) -> Path:
    from mixcl_ray.spaces import space_path

    return space_path(space)


def grid_values(value) -> list:
    """A space dimension's values: its grid, or the one value it is fixed at."""
    return value["grid"] if isinstance(value, dict) else [value]


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


def _subset(cell: dict) -> str:
    """A cell's labelled subset ("0" for a cell recorded before studies had several)."""
    return str(cell.get("label_subset") or "0")


def merge_cells(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with ``new`` added; a cell run again (same method, label fraction, subset and
    seed) replaces the recorded one. Sorted by seed, method, label fraction, subset."""
    cells = {
        (c["method"], float(c["label_fraction"]), _subset(c), str(c["seed"])): c for c in old + new
    }
    return sorted(
        cells.values(),
        key=lambda c: (str(c["seed"]), c["method"], c["label_fraction"], _subset(c)),
    )


def study_summary(cells: list[dict]) -> dict:
    """What the results file says of the study besides its cells: each method's loss weights
    (``methods``) and the paired comparison to scratch (``summary``, differences as Dice
    fractions, scratch's own mean in a row of its own)."""
    from mixcl_ray import paired

    names = sorted({c["method"] for c in cells})
    methods = {
        m: dict(zip(("l_id", "l_label", "l_rec"), method_weights(m), strict=True)) for m in names
    }
    return {"methods": methods, "summary": paired.summary(cells)}


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
            "label_subset": _subset(r),
            "val": r["val"],
            "test": r["test"],
            "run_id": r["run_id"],
            "commit": r.get("commit") or commit,
            "weights": r.get("weights"),
            "hardware": r.get("hardware"),
            "data_fingerprint": r.get("data_fingerprint"),
            "per_case": r.get("per_case"),  # test Dice per case, for the paired intervals
        }
        for r in rows
    ]
    if path.exists() and json.loads(path.read_text()).get("experiment") != experiment:
        raise SystemExit(f"{path} holds another experiment's cells; give --results")
    saved, superseded = read_results(path, experiment, key)
    saved, aside = split_by_weights(saved)
    cells, other = split_by_weights(merge_cells(saved, new))
    payload = {"experiment": experiment, "settings": key, **study_summary(cells), "cells": cells}
    # nothing recorded is dropped: the cells of other weights are kept aside
    superseded += [c for c in aside + other if c not in superseded]
    if superseded:
        payload["superseded"] = superseded
    locations.write_text(path, json.dumps(payload, indent=1) + "\n")
    return cells


def missing_cells(space: Path, cells: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Seed -> method -> the space's label fractions of that method and seed that are not
    recorded for every labelled subset (complete methods and seeds left out)."""
    from mixcl_ray.spaces import load_space

    grid = load_space(space).space
    done = {(c["method"], float(c["label_fraction"]), _subset(c), str(c["seed"])) for c in cells}
    subsets = [str(s) for s in grid_values(grid.get("label_subset", 0))]
    out: dict[str, dict[str, list[float]]] = {}
    fractions = [float(f) for f in grid_values(grid["label_fraction"])]
    for seed in grid_values(grid["seed"]):
        for method in grid_values(grid["method"]):
            left = [
                f for f in fractions if any((method, f, k, str(seed)) not in done for k in subsets)
            ]
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


TARGET_GAIN = 0.05  # Dice points (0.05 = 5 points) over scratch at the smallest label fraction
FLOOR = -0.02  # the lowest the interval may reach at the largest fraction
SINGLE_TERMS = ("identity", "label", "reconstruction")


def target_lines(cells: list[dict]) -> list[str]:
    """Whether MixCL meets the study's targets, each from a paired comparison and its 95 %
    interval: at the smallest fraction at least TARGET_GAIN over scratch with the interval
    above 0, and ahead of every single-term method; at the middle ones ahead of scratch; at
    the largest an interval whose lower end is FLOOR or higher."""
    from mixcl_ray import paired

    fractions = sorted({float(c["label_fraction"]) for c in cells})
    if not fractions:
        return ["targets: no cells"]
    small, large = fractions[0], fractions[-1]
    ahead = "ahead: lower end above 0"
    checks = [(small, "scratch", f"+{TARGET_GAIN:g} or more, lower end above 0")]
    checks += [(small, m, ahead) for m in SINGLE_TERMS]
    checks += [(f, "scratch", ahead) for f in fractions[1:-1]]
    checks += [(large, "scratch", f"lower end {FLOOR:g} or higher")] if large != small else []
    lines = []
    for fraction, baseline, wanted in checks:
        entry = paired.compare(cells, "mixcl", fraction, baseline)
        head = f"target: MixCL vs {baseline} at {100 * fraction:g} % ({wanted})"
        if "ci95" not in entry:
            lines.append(f"{head}: {entry['n_pairs']} pairs, no interval -> not established")
            continue
        diff, (lo, hi) = entry["mean_diff"], entry["ci95"]
        if baseline == "scratch" and fraction == small:
            met = diff >= TARGET_GAIN and lo > 0
        else:
            met = lo >= FLOOR if fraction == large and fraction != small else lo > 0
        lines.append(
            f"{head}: {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] over {entry['n_pairs']} pairs -> "
            f"{'met' if met else 'not met'}"
        )
    return lines
