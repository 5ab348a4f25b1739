"""``python -m mixcl_ray.report``: the method x label-fraction table, the label-efficiency plot
and the trials' validation curves, read from MLflow (the trial runs of a sweep), saved to files
and logged to the sweep's run.

The figures are test-split Dice (``test/dice_mean``), which no choice in the sweep has seen;
mean ± std over runs (seeds and labelled subsets), and each method's paired difference to
scratch at the same label fraction (same labelled subset and seed) with a 95 % bootstrap
interval over the pairs and then the test cases (``mixcl_ray.paired``); an interval that spans
0 is no detectable difference.
Cells from several code versions or kinds of machine are refused unless ``--allow-mixed``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from mixcl_ray import tracking, tracking_access
from mixcl_ray.dimensions import DIMENSIONS
from mixcl_ray.paired import label_arms, row_order

REPORT_METRIC = "test/dice_mean"
CURVE_METRIC = "val/dice_mean"


def collect(
    uri: str, experiment: str, parent_id: str | None = None
) -> tuple[list[dict], str | None]:
    """Finished trial runs of the sweep (the latest sweep of the experiment by default), by
    arm where the sweep varies more than method, fraction, subset and seed
    (``mixcl_ray.paired.label_arms``)."""
    client = tracking._client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(
            f"no MLflow experiment named {experiment!r} at {tracking_access.safe_uri(uri)}"
        )
    if parent_id is None:
        parents = client.search_runs(
            [exp.experiment_id],
            filter_string="tags.`mixcl.stage` = 'sweep'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents:
            raise ValueError(f"experiment {experiment!r} has no sweep run")
        parent_id = parents[0].info.run_id
    rows = []
    for run in tracking.child_runs(uri, exp.experiment_id, parent_id):
        if run.data.tags.get("mixcl.stage") != "trial" or run.info.status != "FINISHED":
            continue
        p, m = run.data.params, run.data.metrics
        if REPORT_METRIC not in m:
            continue
        rows.append(
            {
                "method": p["method"],
                "label_fraction": float(p["label_fraction"]),
                "seed": p.get("seed"),
                "label_subset": p.get("label_subset", "0"),  # the labelled cases of a pair
                "test": m[REPORT_METRIC],
                "val": m.get("val/best_dice_mean", float("nan")),
                "run_id": run.info.run_id,
                "model": run.data.tags.get("model_uri"),  # the trial's MLflow model
                "commit": run.data.tags.get(tracking.CODE_TAG),  # None before it was tagged
                "hardware": run.data.tags.get(tracking.HARDWARE_TAG),  # the fine-tuning's
                # the prepared data's (a benchmark generated on another machine may differ)
                "data_fingerprint": p.get("data_fingerprint"),
                # the pre-training's (l_id, l_label, l_rec); zeros for scratch
                "weights": [float(p.get(k, 0.0)) for k in ("l_id", "l_label", "l_rec")],
                "params": {n: p.get(n) for n in DIMENSIONS},  # what tells arms apart
            }
        )
    return label_arms(rows, DIMENSIONS), parent_id


def with_per_case(uri: str, rows: list[dict]) -> list[dict]:
    """``rows`` with each trial's test Dice per case (``per_case``: {case: mean Dice}), where
    it logged them."""
    out = []
    for row in rows:
        table = tracking.read_table(uri, row["run_id"], tracking.PER_CASE_FILE)
        cases = dict(zip(table["case_id"], table["dice_mean"], strict=True)) if table else None
        out.append(dict(row, per_case=cases))
    return out


def check_one_kind(rows: list[dict]) -> None:
    """Refuse cells from several code versions or kinds of machine: one seed gives the same
    weights on one kind of machine and one code version only, so such cells do not pair."""
    for key, what in (("commit", "code versions"), ("hardware", "kinds of machine")):
        kinds = sorted({str(r.get(key)) for r in rows if r.get(key)})
        if len(kinds) > 1:
            raise ValueError(
                f"the cells come from {len(kinds)} {what} ({'; '.join(kinds)}): rerun them on "
                "one, or pass --allow-mixed to report them anyway"
            )


def summarise(rows: list[dict], key: str = "test") -> dict:
    """{method: {label_fraction: (mean, std, n)}} over runs: seeds and labelled subsets (std
    with ddof=0 for n = 1)."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(row["method"], {}).setdefault(row["label_fraction"], []).append(row[key])
    return {
        m: {f: (float(np.mean(v)), float(np.std(v)), len(v)) for f, v in by.items()}
        for m, by in groups.items()
    }


def render_table(summary: dict, split: str = "Test-split") -> str:
    fractions = sorted({f for by in summary.values() for f in by})
    header = "| method | " + " | ".join(f"{100 * f:g} % labels" for f in fractions) + " |"
    lines = [
        f"{split} Dice (mean ± std over runs: seeds and labelled subsets); in brackets the gain "
        "over scratch.",
        "",
        header,
        "|" + "---|" * (len(fractions) + 1),
    ]
    scratch = summary.get("scratch", {})
    for method in sorted(summary, key=row_order):
        cells = []
        for f in fractions:
            if f not in summary[method]:
                cells.append("-")
                continue
            mean, std, n = summary[method][f]
            cell = f"{mean:.3f} ± {std:.3f} (n={n})" if n > 1 else f"{mean:.3f} (n=1)"
            if method != "scratch" and f in scratch:
                gain = mean - scratch[f][0]
                spread = max(std, scratch[f][1])
                cell += f" [{gain:+.3f}{', within spread' if abs(gain) <= spread and spread > 0 else ''}]"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_models(rows: list[dict]) -> str:
    """Each cell's model with the highest validation Dice (chosen on validation, never on the
    test split), as the URI ``python -m mixcl_ray.predict --model`` takes."""
    best: dict = {}
    for row in rows:
        key = (row["method"], row["label_fraction"])
        if row.get("model") and (key not in best or row["val"] > best[key]["val"]):
            best[key] = row
    if not best:
        return ""
    lines = [
        "Best model of each cell (highest validation Dice), for `python -m mixcl_ray.predict`:"
    ]
    for (method, fraction), row in sorted(
        best.items(), key=lambda kv: (kv[0][0] != "scratch", kv[0])
    ):
        lines.append(
            f"- {method}, {100 * fraction:g} %: {row['model']} "
            f"(validation Dice {row['val']:.3f}, seed {row['seed']})"
        )
    return "\n".join(lines)


def hardware_line(cells: list[dict]) -> str:
    """What the cells were fine-tuned on; a warning when they mix kinds of machine."""
    kinds = sorted({c.get("hardware") or "not recorded" for c in cells})
    if len(kinds) == 1:
        return f"fine-tuned on: {kinds[0]}"
    return (
        f"the cells were fine-tuned on {len(kinds)} kinds of machine ({'; '.join(kinds)}): a "
        "seed's cell can differ between kinds by more than the methods do, so compare cells of "
        "one kind"
    )


def with_curves(uri: str, rows: list[dict]) -> list[dict]:
    """``rows`` with each trial's validation Dice per epoch (``curve``: [(epoch, dice)])."""
    client = tracking._client(uri)
    return [
        dict(
            row,
            curve=sorted(
                (m.step, m.value) for m in client.get_metric_history(row["run_id"], CURVE_METRIC)
            ),
        )
        for row in rows
    ]


def make_report(
    uri: str,
    experiment: str,
    out_dir: str | Path,
    parent_id: str | None = None,
    allow_mixed: bool = False,
    versus: str | None = None,
) -> tuple[str, Path]:
    """The report's text and plot; also ``paired.json``, the paired comparison as data (to
    scratch, or to the method or arm ``versus``)."""
    from mixcl_ray import paired
    from mixcl_ray.plots import label_efficiency_png, validation_curves_png

    # one progress bar per trial's per-case table drowned the report (a user's setting wins)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    rows, parent_id = collect(uri, experiment, parent_id)
    if not rows:
        raise ValueError(
            f"no finished trial with {REPORT_METRIC} in the latest sweep of {experiment!r}"
        )
    if not allow_mixed:
        check_one_kind(rows)
    summary = summarise(rows)
    comparison = paired.summary(with_per_case(uri, rows), versus)
    text = render_table(summary) + "\n\n" + paired.render(comparison, versus)
    text += "\n\n" + hardware_line(rows)
    if best_models(rows):
        text += "\n\n" + best_models(rows)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(text + "\n")
    (out_dir / "paired.json").write_text(
        json.dumps({"versus": versus or "scratch", "summary": comparison}, indent=1) + "\n"
    )
    plot = out_dir / "label_efficiency.png"
    label_efficiency_png(summary, plot, "test Dice (mean over organs)")
    curves = out_dir / "validation_curves.png"
    validation_curves_png(with_curves(uri, rows), curves)
    for path in (out_dir / "report.md", out_dir / "paired.json", plot, curves):
        tracking.log_artifact(uri, parent_id, path, "report")
    return text, plot


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mixcl_ray.report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--experiment", default="mixcl_ray-demo")
    parser.add_argument(
        "--storage",
        "--runs",
        dest="runs",
        type=Path,
        default=Path("runs"),
        help="the --storage of the sweep: where the local MLflow store lives (default: runs)",
    )
    parser.add_argument(
        "--tracking-uri", help="default: $MLFLOW_TRACKING_URI or sqlite:///<runs>/mlflow.db"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for report.md, paired.json, label_efficiency.png and validation_curves.png",
    )
    parser.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="json: the paired comparison to scratch as data",
    )
    parser.add_argument(
        "--versus",
        metavar="ARM",
        help="pair every method or arm with this one instead of scratch, e.g. "
        "'mixcl pretrain_epochs=3' (the names are the rows of the table)",
    )
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="report cells from several code versions or kinds of machine (refused by default)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    uri = args.tracking_uri or tracking.default_tracking_uri(args.runs)
    try:
        out = args.out or args.runs / "report" / args.experiment
        text, plot = make_report(
            uri, args.experiment, out, allow_mixed=args.allow_mixed, versus=args.versus
        )
    except (ValueError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format == "json":
        print((Path(out) / "paired.json").read_text(), end="")
        return 0
    print(text)
    print(f"\nplot: {plot}\nvalidation curves: {plot.with_name('validation_curves.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
