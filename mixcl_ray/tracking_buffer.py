"""Tracking that survives a tracking server going away: a fit never stops for MLflow.

Every epoch's metrics go to MLflow when its server answers. When it does not, they are kept,
with their step and time, in a pending file of the run (one JSON record a line, under
``MIXCL_PENDING_DIR``, by default ``~/.cache/mixcl_ray/pending-metrics``) and sent before the
next epoch's once the server answers again. A run that ends while the server is still away
keeps its closing tags and status in that file too: the run stays RUNNING and tagged nowhere
until the next command that tracks to the same server (or ``flush_all``) sends everything and
closes it, tagged ``mixcl.tracking_gap`` with what was sent late.

    callbacks=[EpochMetricsCallback(uri, run_id)]  # Ray Train, in the controller
    close_run(uri, run_id, "FINISHED", tags)       # the end; False: left pending
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mixcl_ray import tracking, tracking_access

GAP_TAG = "mixcl.tracking_gap"
BATCH = 1000  # MLflow's limit of metrics in one log_batch
SHORT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def pending_dir() -> Path:
    return Path(
        os.environ.get("MIXCL_PENDING_DIR") or Path.home() / ".cache/mixcl_ray/pending-metrics"
    )


def pending_file(run_id: str) -> Path:
    return pending_dir() / f"{run_id}.jsonl"


def answers(uri: str, timeout: float = 3.0) -> bool:
    """Whether the tracking server answers now, asked once with a short timeout (MLflow's own
    client retries a refused connection for about two minutes before it gives up)."""
    if not uri.startswith(("http://", "https://")):
        return True  # a local store: nothing to go away
    try:
        tracking_access.health(uri, timeout)
    except OSError:
        return False
    return True


def _keep(uri: str, run_id: str, record: dict) -> None:
    path = pending_file(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    first = not path.exists()
    with open(path, "a") as handle:
        if first:
            header = {
                "kind": "run",
                "uri": tracking_access.split_credentials(uri)[0],
                "run_id": run_id,
            }
            handle.write(json.dumps(header) + "\n")
        handle.write(json.dumps(record) + "\n")


def _records(run_id: str) -> list[dict]:
    path = pending_file(run_id)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # a line cut short by a process killed while writing it
            continue
    return records


def _send(uri: str, run_id: str, records: list[dict]) -> None:
    """Send the kept records; raises when the server fails on the way."""
    from mlflow.entities import Metric

    client = tracking._client(uri)
    metrics = [
        Metric(k, float(v), r["time"], r["step"])
        for r in records
        if r["kind"] == "metrics"
        for k, v in r["metrics"].items()
    ]
    for i in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH])
    steps = sorted({r["step"] for r in records if r["kind"] == "metrics"})
    end = next((r for r in records if r["kind"] == "end"), None)
    if steps or end:
        gap = f"sent late (tracking server unreachable): metrics of steps {steps}"
        client.set_tag(run_id, GAP_TAG, gap + ("; closing tags and status" if end else ""))
    if end:
        for key, value in end["tags"].items():
            client.set_tag(run_id, key, value)
        client.set_terminated(run_id, status=end["status"])


def flush(uri: str, run_id: str) -> bool:
    """Send what the run kept while the server was away; True when nothing is left pending."""
    records = [r for r in _records(run_id) if r["kind"] != "run"]
    if not records:
        return True
    if not answers(uri):
        return False
    try:
        _send(uri, run_id, records)
    except Exception as err:  # gone again on the way: kept, sent again next time
        print(f"MLflow: kept metrics not sent yet ({type(err).__name__})", file=sys.stderr)
        return False
    pending_file(run_id).unlink()
    print(f"MLflow: sent the {len(records)} records run {run_id} kept while its server was away")
    return True


def flush_all(uri: str) -> list[str]:
    """Send every run's kept records that belong to this tracking server (a command starting
    calls it); the ids of the runs sent."""
    clean = tracking_access.split_credentials(uri)[0]
    sent = []
    for path in sorted(pending_dir().glob("*.jsonl")) if pending_dir().is_dir() else []:
        head = next(iter(_records(path.stem)), {})
        if head.get("uri") == clean and flush(uri, path.stem):
            sent.append(path.stem)
    return sent


def log_step(uri: str, run_id: str, metrics: dict, step: int) -> bool:
    """Log ``metrics`` at ``step`` now, or keep them for later; True when sent."""
    record = {
        "kind": "metrics",
        "step": int(step),
        "time": int(time.time() * 1000),
        "metrics": tracking.loggable(metrics),
    }
    if flush(uri, run_id) and answers(uri):
        try:
            tracking.log_metrics(uri, run_id, record["metrics"], record["step"])
            return True
        except Exception as err:  # the server went away between the check and the call
            print(f"MLflow: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
    _keep(uri, run_id, record)
    print(
        f"MLflow server {tracking_access.safe_uri(uri)} unreachable: step {step}'s metrics kept in "
        f"{pending_file(run_id)}, sent when it answers; training goes on",
        file=sys.stderr,
    )
    return False


def log_epoch(uri: str, run_id: str, metrics: dict) -> bool:
    """One epoch's reported metrics, logged at the epoch as their step (or kept)."""
    logged = {k: v for k, v in metrics.items() if k not in ("epoch", "step")}
    return log_step(uri, run_id, logged, int(metrics.get("epoch", 0)))


def close_run(uri: str, run_id: str, status: str, tags: dict | None = None) -> bool:
    """Tag and close the run, after sending what it kept. With the server away, the tags and
    status are kept with the metrics and the run is left RUNNING (incomplete) until a later
    command sends them; False then, and the message says where they are."""
    tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
    if flush(uri, run_id) and answers(uri):
        try:
            tracking.set_tags(uri, run_id, tags)
            tracking.end_run(uri, run_id, status)
            return True
        except Exception as err:
            print(f"MLflow: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
    _keep(uri, run_id, {"kind": "end", "status": status, "tags": tags})
    print(
        f"MLflow run {run_id} is incomplete: its server {tracking_access.safe_uri(uri)} is unreachable. "
        f"What it has not received (metrics, closing tags, status {status}) is kept in "
        f"{pending_file(run_id)} and sent by the next command that tracks to this server",
        file=sys.stderr,
    )
    return False


class EpochMetricsCallback(tracking._train_callback_base()):
    """Ray Train callback (runs in the controller): rank 0's metrics to MLflow every epoch,
    kept and sent later while the server is away."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def after_report(self, run_context, metrics, checkpoint):
        # a server that dies between the check and the call: MLflow's client would retry for
        # about two minutes (7 times, backoff factor 2) while the controller waits; this
        # process does nothing else with MLflow, so it gives up after two short retries
        for key, value in SHORT_RETRIES.items():
            os.environ.setdefault(key, value)
        log_epoch(self.uri, self.run_id, metrics[0])
