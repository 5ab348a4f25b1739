"""Paired comparisons of a study's cells: each method against scratch at the same label fraction,
trial by trial on the same labelled subset and seed, with a 95 % confidence interval from a
hierarchical bootstrap (the pairs, then the test cases of each pair).

A difference whose interval spans 0 is no detectable difference. A sweep whose grid varies more
than the method, fraction, subset and seed (``l_id``, ``rotate_degrees``, ``lr``, ...) has arms
(``label_arms``): each is its own row of the tables, paired with scratch at the same fine-tuning
settings."""

from __future__ import annotations

import re

import numpy as np

BOOTSTRAP = 2000
PAIR_KEY = ("label_subset", "seed")
# what tells the cells of one arm apart, not the arms
CELL_DIMENSIONS = ("method", "label_fraction", *PAIR_KEY)


def row_order(method: str) -> tuple:
    """Sort key of a table's rows: scratch (and its arms) first, then by name with the numbers
    in it compared as numbers ("pretrain_epochs=3" before "pretrain_epochs=12")."""
    parts = re.split(r"(-?\d+(?:\.\d+)?)", method)
    return (
        not method.startswith("scratch"),
        tuple((0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts)),
    )


def label_arms(rows: list[dict], dimensions) -> list[dict]:
    """Rows (with ``params``: their sweep dimensions' values) labelled by arm: a method whose
    rows differ in some of ``dimensions`` besides ``CELL_DIMENSIONS`` splits into one arm per
    combination of those, ``method`` becoming e.g. "mixcl rotate_degrees=10.0" (``base_method``
    keeps the method); ``baseline`` names the scratch arm of the same fine-tuning settings, the
    one each arm is paired with. Rows of a sweep that varies nothing else keep their names."""

    def varying(method: str) -> list[str]:
        group = [r.get("params") or {} for r in rows if r["method"] == method]
        return [
            n
            for n in dimensions
            if n not in CELL_DIMENSIONS and len({str(p.get(n)) for p in group}) > 1
        ]

    arms = {m: varying(m) for m in {r["method"] for r in rows}}

    def label(method: str, params: dict, names: list[str]) -> str:
        return " ".join([method, *(f"{n}={params.get(n)}" for n in names)])

    out = []
    for row in rows:
        params = row.get("params") or {}
        out.append(
            {
                **row,
                "base_method": row["method"],
                "method": label(row["method"], params, arms[row["method"]]),
                "baseline": label("scratch", params, arms.get("scratch", [])),
            }
        )
    return out


def _pair_key(row: dict) -> tuple:
    return tuple(str(row.get(k) if row.get(k) is not None else "0") for k in PAIR_KEY)


def pairs(rows: list[dict], method: str, fraction: float, baseline: str = "scratch") -> list[dict]:
    """The (method, baseline) trials of one fraction on the same subset and seed: each pair's
    mean difference and, where both logged test Dice per case, the per-case differences."""

    def cell(name):
        return {
            _pair_key(r): r for r in rows if r["method"] == name and r["label_fraction"] == fraction
        }

    mine, base = cell(method), cell(baseline)
    out = []
    for key in sorted(set(mine) & set(base)):
        a, b = mine[key], base[key]
        cases = sorted(set(a.get("per_case") or {}) & set(b.get("per_case") or {}))
        per_case = np.array([a["per_case"][c] - b["per_case"][c] for c in cases], float)
        per_case = per_case[np.isfinite(per_case)]
        out.append(
            {
                "key": key,
                "diff": float(per_case.mean()) if len(per_case) else a["test"] - b["test"],
                "per_case": per_case,
            }
        )
    return out


def bootstrap_ci(found: list[dict], rounds: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the mean paired difference: resample the pairs, then each resampled
    pair's test cases (a pair without per-case values contributes its mean). All rounds at once:
    each pair's case resamples are drawn for every time the pair was picked."""
    rng = np.random.default_rng(seed)
    picked = rng.integers(0, len(found), (rounds, len(found)))  # the pairs of each round
    values = np.empty(picked.shape)
    for i, pair in enumerate(found):
        where = picked == i
        cases = pair["per_case"]
        if len(cases):
            draws = rng.integers(0, len(cases), (int(where.sum()), len(cases)))
            values[where] = cases[draws].mean(axis=1)
        else:
            values[where] = pair["diff"]
    lo, hi = np.percentile(values.mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def summary(rows: list[dict], versus: str | None = None) -> list[dict]:
    """One entry per (method, fraction): scratch's own mean, every other method's paired mean
    difference to scratch with its 95 % interval and number of pairs. ``versus``: a method or
    arm to pair every other one with instead (its own mean first; e.g. one arm of MixCL against
    another, the question of whether a change to the method helps)."""
    if versus is not None and versus not in {r["method"] for r in rows}:
        names = ", ".join(sorted({r["method"] for r in rows}))
        raise ValueError(f"no method or arm named {versus!r} in the sweep; it has: {names}")
    out = []
    fractions = sorted({r["label_fraction"] for r in rows})
    methods = sorted({r["method"] for r in rows}, key=row_order)  # scratch and its arms first
    if versus is not None:
        methods = [versus, *(m for m in methods if m != versus)]
    for fraction in fractions:
        for method in methods:
            cell = [
                r["test"] for r in rows if r["method"] == method and r["label_fraction"] == fraction
            ]
            if not cell:
                continue
            if method == versus or (versus is None and _is_scratch(rows, method)):
                out.append(
                    {
                        "method": method,
                        "label_fraction": fraction,
                        "n": len(cell),
                        "mean": float(np.mean(cell)),
                    }
                )
                continue
            baseline = versus or next(
                r.get("baseline", "scratch") for r in rows if r["method"] == method
            )
            out.append({"method": method, **compare(rows, method, fraction, baseline)})
    return out


def _is_scratch(rows: list[dict], method: str) -> bool:
    """Whether ``method`` (a method or an arm, ``label_arms``) trains from scratch."""
    return any(
        r.get("base_method", r["method"]) == "scratch" for r in rows if r["method"] == method
    )


def compare(rows: list[dict], method: str, fraction: float, baseline: str = "scratch") -> dict:
    """``method`` against ``baseline`` at one label fraction: the number of pairs, and where
    there are any the mean paired difference and (given a spread) its 95 % interval."""
    found = pairs(rows, method, fraction, baseline)
    entry = {"label_fraction": fraction, "n_pairs": len(found)}
    if baseline != "scratch":  # an arm of a sweep that varies more (``label_arms``)
        entry["baseline"] = baseline
    if found:
        entry["mean_diff"] = float(np.mean([p["diff"] for p in found]))
        # one pair without per-case values has no spread to resample
        if len(found) > 1 or len(found[0]["per_case"]) > 1:
            entry["ci95"] = list(bootstrap_ci(found))
    return entry


def render(entries: list[dict], versus: str | None = None) -> str:
    """The entries of ``summary`` as a Markdown table (``versus`` as given to it)."""
    other = versus or "scratch"
    lines = [
        f"Paired difference to {other} (test Dice, same labelled subset and seed; 95 % "
        "bootstrap interval over pairs, then cases):",
        "",
        "| method | label fraction | pairs | difference | 95 % interval | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries:
        fraction = f"{100 * e['label_fraction']:g} %"
        if "mean" in e:  # the baseline (scratch or one of its arms, or versus): its own mean
            lines.append(
                f"| {e['method']} | {fraction} | {e['n']} runs | mean {e['mean']:.3f} | | |"
            )
        elif not e["n_pairs"]:
            lines.append(f"| {e['method']} | {fraction} | 0 | | | no pair with {other} |")
        elif "ci95" not in e:
            lines.append(
                f"| {e['method']} | {fraction} | 1 | {e['mean_diff']:+.3f} | | one pair: no "
                "interval |"
            )
        else:
            lo, hi = e["ci95"]
            verdict = (
                "no detectable difference"
                if lo <= 0 <= hi
                else (f"better than {other}" if lo > 0 else f"worse than {other}")
            )
            lines.append(
                f"| {e['method']} | {fraction} | {e['n_pairs']} | {e['mean_diff']:+.3f} | "
                f"[{lo:+.3f}, {hi:+.3f}] | {verdict} |"
            )
    return "\n".join(lines)
