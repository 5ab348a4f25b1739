"""MLflow tracking: the only module that knows MLflow. The stages call it, never the reverse.

Local store by default: ``sqlite:///<runs>/mlflow.db`` with artifacts under ``<runs>/mlartifacts``;
``MLFLOW_TRACKING_URI`` (or ``--tracking-uri``) points it at a server. One parent run per
sweep; one child run per trial (tag ``mlflow.parentRunId``), and one per pre-training that a
sweep actually trains. Per-epoch metrics go live from the Ray Train controller through
``tracking_buffer.EpochMetricsCallback`` (rank 0's metrics, step = epoch), which keeps them
while the server is away.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from mixcl_ray.tracking_access import safe_uri, set_credentials

PARENT_TAG = "mlflow.parentRunId"
INTERRUPTED_TAG = "mixcl.interrupted"
STOPPED_TAG = "mixcl.stopped"
TRIAL_ID_TAG = "mixcl.tune_trial_id"
RESUMED_TAG = "mixcl.resumed_from"
CODE_TAG = "mixcl.code_version"  # the commit a sweep's driver ran, on its runs
# what a stage's rank 0 computed on (GPU, or CPU model and vector instructions; torch build):
# one seed gives the same result on one kind of machine only
HARDWARE_TAG = "mixcl.hardware"
PER_CASE_FILE = "test_dice_per_case.json"  # a trial's test Dice per case (an MLflow table)
SECRET_WORDS = ("password", "passwd", "secret", "token", "api_key", "access_key", "credential")


def code_version() -> str | None:
    """The commit of the mixcl_ray checkout this runs from, with ``+changes`` when tracked
    files differ from it; None for an installed package or a copy without git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # not a checkout (git would find an enclosing one)
        return None

    def git(*args):
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=root)
        except OSError:  # no git on this machine
            return ""
        return done.stdout if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD").strip()
    if not commit:
        return None
    return commit + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def default_tracking_uri(runs_dir: str | os.PathLike) -> str:
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path(runs_dir).absolute() / 'mlflow.db'}"
    )


def _client(uri: str):
    """A client for ``uri`` (its credentials set aside, ``set_credentials``)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=set_credentials(uri))


def ensure_experiment(uri: str, name: str, artifact_root: str | os.PathLike | None = None) -> str:
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if artifact_root is not None and uri.startswith("sqlite:"):
        location = (Path(artifact_root).absolute() / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def flat_params(params: dict) -> dict[str, str]:
    """MLflow params: flat, stringified, nothing that looks secret."""
    out = {}
    for key, value in params.items():
        if any(word in key.lower() for word in SECRET_WORDS):
            continue
        out[key] = safe_uri(str(value))[:500]
    return out


def find_run(uri: str, experiment_id: str, tag: tuple[str, str], parent_id: str | None = None):
    """The newest run carrying ``tag`` (under ``parent_id``), or None."""
    key, value = tag
    query = f"tags.`{key}` = '{value}'"
    if parent_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_id}'"
    found = _client(uri).search_runs(
        [experiment_id], filter_string=query, max_results=1, order_by=["start_time DESC"]
    )
    return found[0] if found else None


def start_run(
    uri: str,
    experiment_id: str,
    name: str,
    tags: dict,
    params: dict | None = None,
    parent_id: str | None = None,
    reuse_tag: tuple[str, str] | None = None,
    continue_interrupted: bool = True,
) -> str:
    """Create a run, or reuse the one carrying ``reuse_tag``, so that resumes never duplicate
    runs. Returns its id.

    A finished run is reused as it is. An unfinished one (its driver or trial was lost) is
    continued when ``continue_interrupted``; otherwise it is tagged ``mixcl.interrupted``
    (and closed as KILLED if it was still RUNNING: its driver was lost) and a new run, tagged ``mixcl.resumed_from`` with its id, takes over
    (the trial runs: the new attempt's metrics then start where its checkpoint did)."""
    client = _client(uri)
    all_tags = dict(tags)
    if reuse_tag is not None:
        run = find_run(uri, experiment_id, reuse_tag, parent_id)
        if run is not None:
            run_id = run.info.run_id
            if run.info.status == "FINISHED" or continue_interrupted:
                client.update_run(run_id, status="RUNNING")
                return run_id
            client.set_tag(run_id, INTERRUPTED_TAG, "interrupted; resumed in a new run")
            if run.info.status == "RUNNING":  # lost with its driver; FAILED ones stay FAILED
                client.set_terminated(run_id, status="KILLED")
            all_tags[RESUMED_TAG] = run_id
    if parent_id:
        all_tags[PARENT_TAG] = parent_id
    if reuse_tag is not None:
        all_tags[reuse_tag[0]] = reuse_tag[1]
    run = client.create_run(experiment_id, run_name=name, tags=all_tags)
    if params:
        log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    client = _client(uri)
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in flat_params(params).items() if k not in existing]
    if new:
        client.log_batch(run_id, params=new)


def loggable(metrics: dict) -> dict[str, float]:
    """The finite numbers of ``metrics`` (MLflow takes no text, booleans or NaN)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def log_metrics(uri: str, run_id: str, metrics: dict, step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, v, now, step) for k, v in loggable(metrics).items()]
    if batch:
        _client(uri).log_batch(run_id, metrics=batch)


def log_table(uri: str, run_id: str, table: dict, artifact_file: str) -> None:
    _client(uri).log_table(run_id, table, artifact_file)


def read_table(uri: str, run_id: str, artifact_file: str) -> dict | None:
    """A table ``log_table`` wrote ({column: values}); None when the run has none."""
    import json
    import tempfile

    client = _client(uri)
    if artifact_file not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        with open(client.download_artifacts(run_id, artifact_file, tmp)) as handle:
            data = json.load(handle)
    return {c: [row[i] for row in data["data"]] for i, c in enumerate(data["columns"])}


def log_artifact(uri: str, run_id: str, path: str | os.PathLike, folder: str | None = None) -> None:
    _client(uri).log_artifact(run_id, str(path), folder)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def fail_run(uri: str, run_id: str, err: BaseException) -> None:
    """Close a run as FAILED with the error in the tag ``mixcl.error``, unless someone else (the
    sweep driver, after a scheduler stop) has closed it already: a stopped trial's thread can
    outlive the driver's bookkeeping and fail late, when its Train run is torn down."""
    client = _client(uri)
    if client.get_run(run_id).info.status != "RUNNING":
        return
    client.set_tag(run_id, "mixcl.error", f"{type(err).__name__}: {err}"[:1000])
    client.set_terminated(run_id, status="FAILED")


def set_tags(uri: str, run_id: str, tags: dict) -> None:
    """Each tag as text; a None value (not known) is left out."""
    client = _client(uri)
    for key, value in tags.items():
        if value is not None:
            client.set_tag(run_id, key, str(value))


def child_runs(uri: str, experiment_id: str, parent_id: str) -> list:
    return _client(uri).search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'", max_results=10000
    )


def open_trial_runs(uri: str, experiment_id: str, parent_id: str, trial_id: str | None = None):
    """The sweep's trial runs still RUNNING (of one Tune trial if ``trial_id``), except those a
    resume closed as interrupted."""
    query = f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'"
    query += " and tags.`mixcl.stage` = 'trial'"
    if trial_id:
        query += f" and tags.`{TRIAL_ID_TAG}` = '{trial_id}'"
    runs = _client(uri).search_runs([experiment_id], query, max_results=10000)
    return [r for r in runs if INTERRUPTED_TAG not in r.data.tags]


def close_as_stopped(uri: str, run_id: str) -> None:
    """Close the run of a trial that the scheduler stopped mid-fit: KILLED, tagged as such."""
    set_tags(uri, run_id, {STOPPED_TAG: "early stopped by the scheduler"})
    end_run(uri, run_id, "KILLED")


def _tune_callback_base():
    from ray.tune import Callback

    return Callback


class StoppedTrialsCloser(_tune_callback_base()):
    """Tune callback (in the sweep driver): a trial that the scheduler stops has its run closed
    as early stopped right then, not when the sweep ends (the trial's process is torn down
    before it can close the run itself; until the sweep's end such runs showed as RUNNING in
    the dashboard, for hours in a long sweep). A trial that ended on its own closed its run
    already. The tracking URI is not kept on the callback: Tune writes its callbacks into the
    sweep's storage, and a URI can carry credentials; the driver sets ``uri`` on the class."""

    uri: str | None = None

    def __init__(self, experiment_id: str, parent_id: str):
        self.experiment_id, self.parent_id = experiment_id, parent_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not self.uri:
            return
        try:
            for run in open_trial_runs(
                self.uri, self.experiment_id, self.parent_id, trial.trial_id
            ):
                close_as_stopped(self.uri, run.info.run_id)
        except Exception as err:  # the sweep's end closes whatever is left RUNNING
            print(f"could not close the run of stopped trial {trial.trial_id}: {err}")


def _train_callback_base():
    from ray.train.v2.api.callback import UserCallback

    return UserCallback
