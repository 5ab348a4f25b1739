"""``python -m mixcl_ray.tune``: a label-efficiency study on Ray Tune, tracked in MLflow.

With no arguments it runs the built-in demo (``tune_spaces/demo.yaml``) on the synthetic
benchmark, on CPU: the benchmark is generated and prepared on first use into a cache folder,
every trial pre-trains (or reuses a cached pre-training) and fine-tunes, ASHA stops weak trials
early, and the end prints the results table and where the plot and the dashboard are.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from datetime import datetime
from pathlib import Path

from data_prep import locations
from data_prep.locations import Location, describe
from mixcl_ray import tracking, tracking_access
from mixcl_ray.spaces import (
    SPACES_DIR,
    SpaceError,
    load_space,
    make_scheduler,
    make_search,
    to_tune_space,
)
from mixcl_ray.storage import ensure_writable

DEFAULT_SPACE = SPACES_DIR / "demo.yaml"


def resolve_data(spec_data: str | None, data) -> Location:
    """--data, else the space's data, else the built-in benchmark prepared into the cache. A
    folder, an object-store URI, or ``builtin:SIZE`` (a built-in benchmark, prepared on first
    use)."""
    from data_prep.cli import BUILTIN, builtin_benchmark

    chosen = data or spec_data or f"{BUILTIN}small"
    out = builtin_benchmark(chosen)
    if out is not None:
        print(f"data: the built-in synthetic benchmark {chosen}, prepared in {out}")
        return out
    chosen = locations.as_location(chosen)
    if not locations.exists(locations.join(chosen, "manifest.json")):
        raise ValueError(
            f"{describe(chosen)} is not a prepared folder: run `python -m data_prep prepare "
            f"--out {describe(chosen)}` first"
        )
    return chosen


def _sweep_state(storage: Location, space_name: str) -> Location:
    return locations.join(storage, "tune", f"{space_name}.latest.json")


def run_sweep(
    space_path,
    *,
    data: str | Path | None = None,
    storage: str | Path = Path("runs"),
    num_samples: int | None = None,
    resume: bool = False,
    tracking_uri: str | None = None,
    address: str | None = None,
):
    """Run (or resume) a sweep; returns (ray.tune.ResultGrid, report text, plot path, tracking URI)."""
    import ray
    from ray import tune

    from data_prep.reader import read_manifest, read_splits
    from mixcl_ray.ray_start import init_ray
    from mixcl_ray.report import make_report
    from mixcl_ray.trial import SweepContext, run_trial

    spec = load_space(space_path)
    storage = ensure_writable(storage)
    remote = locations.is_remote(storage)
    if remote and not (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
        raise ValueError(
            f"--storage {describe(storage)} is an object store, which cannot hold the default "
            "SQLite tracking database: pass --tracking-uri (a tracking server, or "
            "sqlite:///a/local/mlflow.db) or set MLFLOW_TRACKING_URI"
        )
    uri = tracking_uri or tracking.default_tracking_uri(storage)
    tracking_access.check_reachable(uri)  # before any compute
    data_dir = resolve_data(spec.data, data)
    manifest = read_manifest(data_dir)
    state_file = _sweep_state(storage, spec.name)
    if resume:
        if not locations.exists(state_file):
            raise ValueError(
                f"nothing to resume: no earlier sweep of {spec.name} in {describe(storage)}"
            )
        state = json.loads(locations.read_text(state_file))
    else:
        state = {"name": f"{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"}
    experiment_id = tracking.ensure_experiment(
        uri, spec.experiment, None if remote else storage / "mlartifacts"
    )
    version = tracking.code_version()
    code_tag = {tracking.CODE_TAG: version} if version else {}
    parent_id = tracking.start_run(
        uri,
        experiment_id,
        state["name"],
        {"mixcl.stage": "sweep", "space": spec.name, **code_tag},
        {
            "space": spec.name,
            "preset": spec.preset,
            "data_fingerprint": manifest["input_fingerprint"][:16],
            "metric": spec.metric,
            "num_samples": num_samples or spec.num_samples,
            "scheduler": spec.scheduler.get("type"),
            "search": spec.search,
        },
        reuse_tag=("mixcl.sweep", state["name"]),
    )
    state["parent_run_id"] = parent_id
    locations.write_text(state_file, json.dumps(state))
    with tempfile.TemporaryDirectory(prefix="mixcl-sweep-") as tmp:
        artifacts = [Path(space_path)] if Path(space_path).exists() else []
        for name, read in (("manifest.json", read_manifest), ("splits.json", read_splits)):
            artifacts.append(Path(tmp, name))  # local copies: the data may be remote
            artifacts[-1].write_text(json.dumps(read(data_dir), indent=1))
        for artifact in artifacts:
            tracking.log_artifact(uri, parent_id, artifact, "sweep")

    # a fine-tuning validates every val_every epochs (and always at its last), so its other
    # epochs report no validation metric: Tune's check that every result has the space's
    # metric would end the sweep at the first of them (ASHA decides on validated epochs only)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    init_ray(address)
    ctx = SweepContext(
        data=str(data_dir),
        storage=str(storage),
        uri=tracking_access.with_env_credentials(
            uri
        ),  # trials on other nodes lack this environment
        experiment_id=experiment_id,
        parent_id=parent_id,
        sweep=state["name"],
        preset=spec.preset,
        fingerprint=manifest["input_fingerprint"],
        pretrain=spec.pretrain,
        finetune=spec.finetune,
        resources=dict(spec.resources),
        pretrain_cache=spec.pretrain_cache,
        code_tag=code_tag,
    )
    param_space = to_tune_space(spec.space, spec.search)
    scheduler = make_scheduler(spec)
    search_alg = make_search(spec)
    # the trial driver needs almost no CPU of its own; its Train workers reserve theirs
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=ctx), {"cpu": 0.01})
    tune_dir = locations.join(storage, "tune", state["name"])
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        tuner = tune.Tuner.restore(
            str(tune_dir), trainable=trainable, resume_errored=True, param_space=param_space
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=spec.metric,
                mode=spec.mode,
                scheduler=scheduler,
                search_alg=search_alg,
                num_samples=num_samples or spec.num_samples,
            ),
            run_config=tune.RunConfig(
                name=state["name"],
                storage_path=str(locations.join(storage, "tune")),
                callbacks=[tracking.StoppedTrialsCloser(experiment_id, parent_id)],
                verbose=1,
            ),
        )
    tracking.StoppedTrialsCloser.uri = uri
    results = tuner.fit()
    errored = {r.metrics.get("trial_id") for r in results if r.error}
    # trial runs still open: stopped ones StoppedTrialsCloser could not close, errored ones
    for run in tracking.open_trial_runs(uri, experiment_id, parent_id):
        trial_id = run.data.tags.get(tracking.TRIAL_ID_TAG)
        if trial_id and trial_id not in errored:
            tracking.close_as_stopped(uri, run.info.run_id)
        else:
            tracking.end_run(uri, run.info.run_id, "FAILED")
    report_dir = locations.join(storage, "report", state["name"])
    try:
        if remote:  # written locally, then uploaded next to the Tune state
            with tempfile.TemporaryDirectory(prefix="mixcl-report-") as local:
                text, plot = make_report(uri, spec.experiment, local, parent_id)
                locations.upload_folder(Path(local), report_dir)
            plot = locations.join(report_dir, Path(plot).name)
        else:
            text, plot = make_report(uri, spec.experiment, report_dir, parent_id)
    except ValueError as err:
        text, plot = f"no report: {err}", None
    tracking.end_run(uri, parent_id, "FINISHED")
    del ray
    return results, text, plot, uri


def build_parser() -> argparse.ArgumentParser:
    from mixcl_ray.dimensions import markdown

    parser = argparse.ArgumentParser(
        prog="python -m mixcl_ray.tune",
        description=textwrap.fill(
            "Run a label-efficiency study: Ray Tune over loss weights, temperatures and label "
            "fractions; each trial pre-trains (cached) and fine-tunes on Ray Train; MLflow "
            "records every run. With no arguments: the built-in demo on the synthetic "
            "benchmark, on CPU (about 40 minutes on 2 cores)."
        ),
        epilog="dimensions of a space file (also the params of every trial in MLflow):\n\n"
        + markdown(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--space",
        default=str(DEFAULT_SPACE),
        help="search space file or name in tune_spaces/ (demo, ablation, label_efficiency, search, "
        "spleen, btcv)",
    )
    parser.add_argument(
        "--data",
        help="prepared folder, object-store URI, or builtin:SIZE for a built-in benchmark "
        "(builtin:small, builtin:study; default: the space's data, else builtin:small)",
    )
    parser.add_argument(
        "--num-samples", type=int, help="samples per grid point (default: the space's)"
    )
    parser.add_argument(
        "--storage",
        default="runs",
        help="checkpoints, Tune state, the pre-training cache, reports and the local MLflow store "
        "(default: runs); on a cluster a folder every node mounts, or an object-store URI such "
        "as s3://bucket/runs (then with --tracking-uri)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the last interrupted sweep of this space"
    )
    parser.add_argument(
        "--address",
        help="Ray cluster address: auto or ray://HOST:PORT; local starts a new local instance "
        "(default: a running local cluster if there is one, else a new local instance)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or a SQLite file in --storage)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        results, text, plot, uri = run_sweep(
            args.space,
            data=args.data,
            storage=args.storage,
            num_samples=args.num_samples,
            resume=args.resume,
            tracking_uri=args.tracking_uri,
            address=args.address,
        )
    except (SpaceError, ValueError, OSError) as err:  # OSError: connection, files, object store
        print(f"error: {err}", file=sys.stderr)
        return 2
    minutes = (time.perf_counter() - start) / 60
    errors = [r for r in results if r.error]
    print(f"\nstudy finished in {minutes:.1f} min: {len(results)} trials, {len(errors)} failed")
    print(text)
    if plot:
        print(f"\nlabel-efficiency plot: {describe(plot)}")
    print(
        f"dashboard: mlflow ui --backend-store-uri {tracking_access.safe_uri(uri)}   (then open http://127.0.0.1:5000)"
    )
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
