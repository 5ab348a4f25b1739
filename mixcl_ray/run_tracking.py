"""MLflow tracking of a standalone ``pretrain`` or ``finetune``: one run per command, with the
param and metric names of a sweep's runs, in the local store under ``--storage``
(``<storage>/mlflow.db``) unless ``MLFLOW_TRACKING_URI`` names another.

    with StandaloneRun("finetune", storage, "mixcl_ray-finetune", name, params) as run:
        result = run_finetuning(..., callbacks=run.callbacks)  # every epoch's metrics
        run.finish(tags)
"""

from __future__ import annotations

import os
import sys

from data_prep import locations
from mixcl_ray import tracking, tracking_access, tracking_buffer


class StandaloneRun:
    """The MLflow run of one command. An object store under ``--storage`` cannot hold the
    SQLite store: without ``MLFLOW_TRACKING_URI`` the command then runs untracked and says so."""

    def __init__(self, stage: str, storage, experiment: str, name: str, params: dict):
        self.stage, self.storage, self.experiment = stage, storage, experiment
        self.name, self.params = name, params
        self.uri = self.run_id = None
        self.callbacks: list = []
        self.tags: dict = {}

    def __enter__(self) -> StandaloneRun:
        if locations.is_remote(self.storage) and not os.environ.get("MLFLOW_TRACKING_URI"):
            print(
                "not tracked in MLflow: an object store cannot hold the SQLite tracking store "
                "(set MLFLOW_TRACKING_URI to track this run)",
                file=sys.stderr,
            )
            return self
        self.uri = tracking.default_tracking_uri(self.storage)
        tracking_access.check_reachable(self.uri)
        tracking_buffer.flush_all(self.uri)  # what earlier runs kept while the server was away
        root = None if locations.is_remote(self.storage) else f"{self.storage}/mlartifacts"
        experiment_id = tracking.ensure_experiment(self.uri, self.experiment, root)
        version = tracking.code_version()
        tags = {"mixcl.stage": self.stage, **({tracking.CODE_TAG: version} if version else {})}
        self.run_id = tracking.start_run(self.uri, experiment_id, self.name, tags, self.params)
        controller_uri = tracking_access.with_env_credentials(
            self.uri
        )  # it may run on another node
        self.callbacks = [tracking_buffer.EpochMetricsCallback(controller_uri, self.run_id)]
        print(
            f"MLflow run {self.run_id} in {tracking_access.safe_uri(self.uri)} ({self.experiment})"
        )
        return self

    def log_model(self, best_model, card: dict, register: str | None = None) -> str | None:
        """The fine-tuned model as this run's MLflow model; its URI (None: untracked)."""
        if self.run_id is None:
            return None
        from mixcl_ray.mlflow_model import log_model

        if tracking_buffer.answers(self.uri):
            try:
                return log_model(self.uri, self.run_id, best_model, card, register)
            except Exception as err:
                if tracking_buffer.answers(self.uri):
                    raise  # a fault of the model logging itself, not of the server
                print(f"MLflow: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
        self.tags["mixcl.model_not_logged"] = "the tracking server was unreachable"
        print("MLflow server unreachable: the model was not logged", file=sys.stderr)
        return None

    def finish(self, tags: dict) -> None:
        """The run's closing tags, set when it closes."""
        self.tags.update(tags)

    def __exit__(self, kind, err, tb) -> None:
        """Close the run; with its server away, what it did not receive is kept for the next
        command (``tracking_buffer.close_run``): the fit's result is never lost for MLflow."""
        if self.run_id is None:
            return
        if err is None:
            tracking_buffer.close_run(self.uri, self.run_id, "FINISHED", self.tags)
        elif tracking_buffer.flush(self.uri, self.run_id) and tracking_buffer.answers(self.uri):
            tracking.fail_run(self.uri, self.run_id, err)
        else:
            error = {"mixcl.error": f"{type(err).__name__}: {err}"[:1000]}
            tracking_buffer.close_run(self.uri, self.run_id, "FAILED", error)
