"""Command line: ``python -m data_prep {synthetic,prepare,inspect}``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_prep import locations
from data_prep.errors import DataPrepError
from data_prep.preprocess import PRESETS

DEFAULT_CACHE = Path(os.environ.get("MIXCL_RAY_CACHE", Path.home() / ".cache" / "mixcl_ray"))


BUILTIN = "builtin:"  # a space's or --data's name for a built-in benchmark: builtin:SIZE


def default_benchmark(seed: int = 0, size: str = "small", progress: bool = True) -> Path:
    """The built-in synthetic benchmark, generated into the cache on first use."""
    from data_prep.synthetic import generate

    path = DEFAULT_CACHE / f"synthetic-{size}-seed{seed}"
    if not (path / "benchmark.json").exists():
        print(f"generating the built-in synthetic benchmark into {path}", file=sys.stderr)
        generate(path, seed=seed, size=size, progress=progress)
    return path


def prepared_benchmark(size: str = "small", seed: int = 0, progress: bool = True) -> Path:
    """The built-in benchmark of ``size`` prepared into the cache (generated first if needed),
    split with that size's validation and test shares; reused once prepared."""
    from data_prep.prepare import PrepareOptions, prepare
    from data_prep.synthetic import SPLIT_RATIOS

    if size not in SPLIT_RATIOS:
        raise ValueError(
            f"unknown built-in benchmark {BUILTIN}{size}; choose one of "
            + ", ".join(BUILTIN + s for s in SPLIT_RATIOS)
        )
    val_ratio, test_ratio = SPLIT_RATIOS[size]
    out = DEFAULT_CACHE / f"prepared-{size}-seed{seed}"
    options = PrepareOptions(seed=seed, val_ratio=val_ratio, test_ratio=test_ratio)
    prepare([default_benchmark(seed, size, progress)], out, options, progress=progress)
    return out


def builtin_benchmark(data, progress: bool = True) -> Path | None:
    """The built-in benchmark that ``data`` names (``builtin:SIZE``), prepared on first use;
    None for any other data (a folder, an object-store URI)."""
    if isinstance(data, str) and data.startswith(BUILTIN):
        return prepared_benchmark(data[len(BUILTIN) :], progress=progress)
    return None


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated fractions, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Prepare NIfTI datasets for mixcl_ray: validate, resample and normalise once, "
        "then write Parquet shards, manifest.json and splits.json.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    syn = sub.add_parser(
        "synthetic",
        help="write the built-in synthetic benchmark (MSD layout)",
        description="Write procedural abdominal-CT-like phantoms: several partially "
        "labelled sources, an unlabelled pool and a spleen target task.",
    )
    syn.add_argument(
        "--out", required=True, type=Path, help="folder to write (replaced atomically)"
    )
    syn.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    syn.add_argument(
        "--size",
        choices=["small", "medium", "study"],
        default="small",
        help="small: 86 small volumes, a study cell runs in minutes on 2 CPU cores; study: the "
        "same volumes with 90 target cases (prepare it with 10 validation and 30 test cases: "
        "python -m mixcl_ray.tune --data builtin:study does); medium: larger volumes",
    )
    syn.add_argument(
        "--max-cases",
        type=int,
        default=None,
        help="at most this many cases per source (quick trials)",
    )

    prep = sub.add_parser(
        "prepare",
        help="prepare one or more datasets into Parquet shards",
        description="Read MSD (dataset.json), BTCV (dataset_0.json) or plain image/label folders, "
        "check every case, preprocess with MONAI transforms and write OUT atomically. Without "
        "--dataset it prepares the built-in synthetic benchmark.",
    )
    prep.add_argument(
        "--dataset",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="dataset folder (repeat to build one pre-training corpus); a folder with "
        "benchmark.json expands to its sources. Default: the built-in benchmark",
    )
    prep.add_argument(
        "--out",
        default="data/prepared",
        help="output folder or object-store URI such as s3://bucket/prepared (default: "
        "data/prepared); a URI is staged on local disk and uploaded when every case is written",
    )
    prep.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="auto",
        help="intensity preset: spleen (CT -57..164 HU), btcv/ct (-175..250 HU), mr "
        "(percentile clip + z-score); auto follows each dataset's modality",
    )
    prep.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="target voxel spacing in mm (default 1.5 1.5 2.0)",
    )
    prep.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    prep.add_argument("--val-ratio", type=float, default=0.2)
    prep.add_argument("--test-ratio", type=float, default=0.2)
    prep.add_argument(
        "--label-fractions",
        type=_fractions,
        default=None,
        help="nested label fractions (default 0.05,0.15,0.25,0.5,1)",
    )
    prep.add_argument("--target", help="name of the target source (recorded in the manifest)")
    prep.add_argument(
        "--skip-bad",
        action="store_true",
        help="prepare the good cases and list the bad ones instead of stopping",
    )
    prep.add_argument("--cases-per-shard", type=int, default=8)
    prep.add_argument(
        "--address",
        default=None,
        help="Ray address to connect to (e.g. auto); default: start Ray locally",
    )
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")

    ins = sub.add_parser("inspect", help="summarise a prepared folder")
    ins.add_argument("out", help="prepared folder or object-store URI")
    return parser


def _prepare(args: argparse.Namespace) -> int:
    import time

    import ray

    from data_prep.inspect_out import summarise
    from data_prep.prepare import PrepareOptions, prepare
    from data_prep.splits import LABEL_FRACTIONS

    datasets = args.dataset or [default_benchmark(progress=not args.no_progress)]
    options = PrepareOptions(
        preset=args.preset,
        spacing=tuple(args.spacing) if args.spacing else None,
        seed=args.seed,
        val_ratio=args.val_ratio,
        test_ratio=args.test_ratio,
        label_fractions=args.label_fractions or LABEL_FRACTIONS,
        skip_bad=args.skip_bad,
        cases_per_shard=args.cases_per_shard,
        target=args.target,
    )
    start = time.perf_counter()
    try:
        if args.address:
            ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
        result = prepare(datasets, args.out, options, progress=not args.no_progress)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    seconds = time.perf_counter() - start
    if result.reused:
        print(
            f"{locations.describe(result.out)} is up to date with its inputs: reused, nothing recomputed"
        )
    else:
        print(
            f"prepared {result.num_cases} cases in {seconds:.1f} s "
            f"({result.num_cases / seconds:.2f} cases/s, {result.input_bytes / 1e6 / seconds:.1f} MB/s of input)"
        )
    for skipped in result.skipped:
        print(f"skipped: {skipped['problem']}")
    print()
    print(summarise(result.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "synthetic":
            from data_prep.synthetic import generate

            path = generate(args.out, seed=args.seed, size=args.size, max_cases=args.max_cases)
            print(f"wrote the synthetic benchmark to {path}")
            return 0
        if args.command == "inspect":
            from data_prep.inspect_out import summarise

            print(summarise(args.out))
            return 0
        return _prepare(args)
    except (DataPrepError, ValueError, OSError) as err:  # OSError: an object store refused
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the previous output (if any) is untouched", file=sys.stderr)
        return 130
